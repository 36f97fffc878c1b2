"""`flowrl-jax check`: one RL step's programs compiled ahead of time for a TPU slice.

The TPU compiler comes from libtpu (the `tpu-aot` extra, installed by `make test`); the
compiling tests are skipped, with that reason, only where libtpu cannot be imported.
"""

import json

import jax
import pytest
from flax import nnx

from flowrl_jax import cli, cpu_runtime
from flowrl_jax.aot.report import Row, check_arch, format_row, oom_bytes, run_check, summary
from flowrl_jax.aot.topologies import SLICES, get_slice, libtpu_available
from flowrl_jax.commands import check as check_cmd
from flowrl_jax.config import ConfigError, load_config, preset_arch
from flowrl_jax.mesh import make_mesh
from flowrl_jax.models.qwen2 import Numerics, Qwen2ForCausalLM
from flowrl_jax.rl.train_state import abstract_train_state, create_train_state

HAVE_LIBTPU, NO_LIBTPU = libtpu_available()
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason=NO_LIBTPU)

ROW_KEYS = {"program", "compile_s", "hbm_bytes_per_chip", "hbm_capacity_bytes", "fits",
            "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "resident_bytes",
            "flops", "estimate_bytes_per_chip", "overflow_bytes"}


def tiny_config(*extra):
    """The tiny model (configs/models/tiny.yaml) in a small RL step, on a 2×2 v5e."""
    return load_config("configs/demo.yaml", [
        "model.arch=null", "model.preset=tiny", "model.compute_dtype=bfloat16",
        "data.max_prompt_length=16", "data.length_buckets=[16]", "rollout.prefill_buckets=[16]",
        "rollout.max_new_tokens=16", "rollout.decode_chunk=4", "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=8", "trainer.logprob_micro_batch_size=16", *extra])


@pytest.fixture(autouse=True)
def _quiet_libtpu():
    cpu_runtime.quiet_tpu_compiler_environment()
    # the TPU programs use splash attention, whose 16-bit kernels need the default matmul
    # precision, not the "highest" the test session sets for CPU parity (conftest)
    with jax.default_matmul_precision("default"):
        yield


def test_slices_and_bad_input():
    assert get_slice("v5e-8").chips == 8 and get_slice("v5p-64").chips == 32
    assert get_slice("v5p-256").chips == 128 and get_slice("v6e-8").chips == 8
    assert get_slice("v5e-8").chips_per_host_bounds == (2, 4, 1)
    assert all(s.hbm_bytes > 0 for s in SLICES.values())
    # an unknown slice is bad input (exit 2), named, before anything compiles
    assert cli.main(["check", "--config", "configs/demo.yaml", "--topology", "v9-8"]) == 2
    assert cli.main(["check", "--config", "configs/demo.yaml", "--topology", "v5e-4",
                     "--programs", "train_step,nope"]) == 2


def test_oom_message_parsed():
    gib = 1024 ** 3
    got = oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                    "for HLO temporaries (115.63G) exceeds available HBM (15.75G).")
    assert got == int(115.63 * gib)
    assert oom_bytes("HLO temporaries 133.50G exceed available HBM 95.74G") == int(133.5 * gib)
    assert oom_bytes("Ran out of memory in memory space hbm. Used 17.25G of 15.75G hbm.") \
        == int(17.25 * gib)
    assert oom_bytes("INVALID_ARGUMENT: shapes do not match") is None


def test_abstract_train_state_matches_the_concrete_one():
    """The abstract state `check` compiles with has the tree, shapes, dtypes and shardings
    `create_train_state` builds (FlowRL: policy + Z_φ + AdamW moments)."""
    cfg = load_config("configs/demo.yaml", ["model.arch=null", "model.preset=tiny"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    model = Qwen2ForCausalLM(preset_arch("tiny"), Numerics.from_config(cfg.model),
                             rngs=nnx.Rngs(0))
    real = create_train_state(cfg, model, mesh, rng=0)
    fake = abstract_train_state(cfg, preset_arch("tiny"), mesh)
    assert [n for n, _ in real.graphdefs] == [n for n, _ in fake.graphdefs]
    real_leaves = jax.tree_util.tree_flatten_with_path(real.replace(graphdefs=()))[0]
    fake_leaves = jax.tree_util.tree_flatten_with_path(fake.replace(graphdefs=()))[0]
    assert [p for p, _ in real_leaves] == [p for p, _ in fake_leaves]
    assert len(real_leaves) > 20
    for (_, r), (_, f) in zip(real_leaves, fake_leaves):
        assert isinstance(f, jax.ShapeDtypeStruct)
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
        assert r.sharding.is_equivalent_to(f.sharding, r.ndim)


@pytest.mark.slow  # ~40 s on 2 idle cores: the train step's TPU compile dominates
@needs_libtpu
def test_tiny_step_compiles_for_tpu(capsys):
    """Train step, log-prob pass and decode chunk of the tiny model compile for a v5e 2×2;
    each row's HBM is memory_analysis' arguments + outputs + temporaries − aliases + what
    stays resident, and `fits` compares it with the capacity."""
    sl = get_slice("v5e-4")
    cfg = tiny_config()
    programs = {"train_step", "logprobs_old", "sampler_decode"}
    rows = run_check(cfg, cfg.model.arch, sl, only=programs, as_json=True)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["program"] for r in lines] == ["train_step", "logprobs_old", "sampler_decode"]
    for rec, row in zip(lines, rows):
        assert ROW_KEYS <= set(rec), ROW_KEYS - set(rec)
        assert rec["error"] is None, rec["error"]
        assert row.argument_bytes > 0 and row.output_bytes > 0 and row.flops > 0
        assert rec["hbm_bytes_per_chip"] == (row.argument_bytes + row.output_bytes
                                             + row.temp_bytes - row.alias_bytes
                                             + row.resident_bytes)
        assert rec["hbm_capacity_bytes"] == int(15.75 * 1024 ** 3)  # the compiler's v5e figure
        assert rec["fits"] is (rec["hbm_bytes_per_chip"] <= rec["hbm_capacity_bytes"])
        assert rec["fits"] and rec["overflow_bytes"] == 0
    step = rows[0]
    # the train state (params, Z_φ, AdamW moments) and the batch are its arguments; the
    # state is donated, so it is aliased to the outputs
    assert step.alias_bytes > 0
    # the decode chunk's arguments hold the whole KV cache, sharded over the 4 chips
    arch = cfg.model.arch
    cache = (2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.resolved_head_dim
             * 2)  # bf16 bytes per slot and position
    assert rows[2].argument_bytes >= cache * 32 * 32 // 4  # 32 slots × 32 positions


@needs_libtpu
def test_too_large_is_reported_with_exit_1(capsys):
    """A capacity the program exceeds: not fitting, the program and overflow named, exit 1."""
    cfg = tiny_config()
    code = check_cmd.check(cfg, get_slice("v5e-4"), only={"sampler_decode"},
                           capacity_bytes=4096)
    out = capsys.readouterr().out
    assert code == 1
    assert "does not fit: sampler_decode needs" in out and "over by" in out
    row_line = [x for x in out.splitlines() if x.startswith("sampler_decode")][0]
    assert " NO " in row_line


@needs_libtpu
def test_too_large_model_fails_without_compiling(capsys):
    """The 0.5B config with Qwen2.5-72B's architecture on a v5e-8: every program's
    arguments alone exceed a chip's HBM, so it is reported as not fitting, program and
    overflow named, exit 1, without compiling anything (seconds, not the 72B compile)."""
    code = cli.main(["check", "--config", "configs/qwen2.5-0.5b-math.yaml", "--topology",
                     "v5e-8", "--programs", "train_step,sampler_decode", "model.path=null",
                     "model.preset=qwen2.5-72b"])
    out = capsys.readouterr().out
    assert code == 1
    assert "does not fit: train_step needs" in out and "sampler_decode needs" in out
    assert "over by" in out and "not compiled" in out
    step = [x for x in out.splitlines() if x.startswith("train_step")][0]
    assert " NO " in step and float(step.split()[2]) > 100  # GiB per chip: 72B f32 state / 8


def test_architecture_from_the_path_name_when_the_path_is_absent():
    """The shipped configs name a local HF folder (`models/Qwen2.5-7B`); without it, `check`
    compiles the preset of that name; an unknown name without a preset is bad input."""
    cfg = load_config("configs/qwen2.5-7b-math.yaml")
    assert check_arch(cfg) == preset_arch("qwen2.5-7b")
    bad = load_config("configs/qwen2.5-7b-math.yaml", ["model.path=models/NoSuchModel"])
    with pytest.raises(ConfigError, match="model.preset"):
        check_arch(bad)


def test_summary_and_rows_without_compiling():
    gib = 1024 ** 3
    ok = Row("train_step", "v5e-8", 1.0, gib, gib, gib, gib, 0, 2 * gib, 16 * gib, True, 0,
             1e12, 3 * gib, "x")
    bad = Row("sampler_decode", "v5e-8", 1.0, 0, 0, 0, 0, gib, 20 * gib, 16 * gib, False,
              4 * gib, None, None, "y", "XlaRuntimeError: RESOURCE_EXHAUSTED")
    assert summary([ok]) == "all 1 programs fit"
    assert summary([ok, bad]) == ("does not fit: sampler_decode needs 20.00 GiB per chip of "
                                  "16.00 GiB (over by 4.00 GiB)")
    assert "RESOURCE_EXHAUSTED" in format_row(bad) and " NO " in format_row(bad)


def test_cpu_platform_chosen_when_libtpu_has_no_chips(monkeypatch):
    """With libtpu installed on a machine without TPU chips the CLI picks the CPU platform
    (no TPU probing, no libtpu warnings); an explicit JAX_PLATFORMS or TPU chips win."""
    chosen = []
    monkeypatch.setattr(jax.config, "update", lambda k, v: chosen.append((k, v)))
    monkeypatch.setattr(cpu_runtime, "libtpu_installed", lambda: True)
    monkeypatch.setattr(cpu_runtime, "tpu_chips_present", lambda: False)
    monkeypatch.setattr(cpu_runtime.os.path, "exists", lambda p: False)  # no NVIDIA devices
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_runtime.select_platform() is None and chosen == []
    monkeypatch.delenv("JAX_PLATFORMS")
    assert cpu_runtime.select_platform() == "cpu"
    assert chosen == [("jax_platforms", "cpu")]
    monkeypatch.setattr(cpu_runtime, "tpu_chips_present", lambda: True)
    assert cpu_runtime.select_platform() is None and len(chosen) == 1
    monkeypatch.setattr(cpu_runtime, "tpu_chips_present", lambda: False)
    monkeypatch.setattr(cpu_runtime, "libtpu_installed", lambda: False)
    assert cpu_runtime.select_platform() is None and len(chosen) == 1


@pytest.mark.slow  # ~15-30 s on 2 shared cores: one decode chunk at Qwen2.5-0.5B width
@needs_libtpu
def test_estimator_within_15_percent_of_the_compiled_paged_decode(capsys):
    """The estimator's sampling peak (train state + page pool + the decode chunk's
    temporaries) is within 15 % of what the TPU compiler allocates for the paged decode
    chunk: Qwen2.5-0.5B's width cut to 2 layers, 256 slots × 8,192 positions on a v5e 2×2,
    a 2 GiB pool split over the 4 chips' slot shards (each holds 1/4 of it)."""
    cfg = tiny_config("model.preset=qwen2.5-0.5b", "model.arch.num_hidden_layers=2",
                      "rollout.max_new_tokens=8160", "rollout.prompts_per_step=32",
                      "rollout.decode_slots=256", "rollout.kv_cache=paged",
                      "rollout.kv_cache_gib=2")
    rows = run_check(cfg, cfg.model.arch, get_slice("v5e-4"), only={"sampler_decode"},
                     as_json=True)
    capsys.readouterr()
    (row,) = rows
    assert row.error is None, row.error
    pool = 2 * 1024 ** 3
    assert pool / 4 <= row.argument_bytes < pool / 2  # a quarter of the pool per chip
    err = row.estimate_bytes_per_chip / row.hbm_bytes_per_chip - 1
    assert abs(err) < 0.15, (row.estimate_bytes_per_chip, row.hbm_bytes_per_chip)
