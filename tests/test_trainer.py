"""The RL loop end to end on a tiny Qwen2 and a token-id task, for every algorithm; config
and data errors surface before any compute, naming the key."""

import json
import math

import numpy as np
import pytest
from _wandb_offline import history
from trainer_toy import ToyTask, checkpoint_arrays, start_train, toy_overrides, train_env

from flowrl_jax import cli
from flowrl_jax.config import ConfigError, load_config
from flowrl_jax.rl.metrics import KEY_STYLE
from flowrl_jax.run_files import read_metrics
from flowrl_jax.rl.trainer import Trainer

ALGOS = ("flowrl", "grpo", "ppo", "reinforce_pp")
COMMON_KEYS = (
    "reward/mean", "reward/toy/mean", "reward/accuracy", "reward/toy/accuracy",
    "response_length/mean", "response_length/max", "response_length/truncated_frac",
    "entropy/rollout", "kl/old", "loss/total", "optimizer/grad_norm", "optimizer/grad_norm_policy",
    "optimizer/lr", "optimizer/skipped_frac", "optimizer/skipped_total", "time/sampling",
    "time/reward", "time/logprobs", "time/update", "time/step", "throughput/tokens_per_s",
)
ALGO_KEYS = {
    "flowrl": ("flowrl/log_z_mean", "flowrl/w_mean", "flowrl/clip_frac", "kl/ref", "rhat/mean",
               "rhat/std"),
    "grpo": ("policy/clip_frac", "rhat/mean"),
    "ppo": ("loss/value", "value/mean"),
    "reinforce_pp": ("policy/clip_frac",),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two rollout steps of each algorithm, run concurrently through the CLI."""
    root = tmp_path_factory.mktemp("algos")
    extra = {"flowrl": {"trainer.export_hf": "true", "trainer.ref_offload": "true"},
             "grpo": {"trainer.validate_every": 2, "eval.greedy": "true",
                      "eval.max_new_tokens": 4},
             "reinforce_pp": {"trainer.loggers": "[jsonl,wandb]"}}  # W&B offline, no TensorBoard
    wandb_env = train_env(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
    procs = {a: start_train(root / a, toy_overrides(a, 2, **{"trainer.checkpoint_every": 2,
                                                               **extra.get(a, {})}),
                            env=wandb_env if a == "reinforce_pp" else None)
             for a in ALGOS}
    for a, p in procs.items():
        assert p.wait(600) == 0, (root / f"{a}.log").read_text()[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_metrics_of_each_algorithm(runs, algo):
    recs = read_metrics(runs / algo)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for k in COMMON_KEYS + ALGO_KEYS[algo]:
            assert k in r, f"{algo}: metric {k!r} missing (has {sorted(r)})"
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (algo, k, r[k])
        assert r["optimizer/updates"] == 2  # 16 sequences / mini-batch 8, one epoch
        assert -1.0 <= r["reward/mean"] <= 1.0 and 0.0 <= r["reward/accuracy"] <= 1.0
        assert r["response_length/max"] <= 8
    # one naming style for every key the trainer writes (read raw: no alias renaming)
    raw = [json.loads(line) for line in (runs / algo / "metrics.jsonl").read_text().splitlines()]
    off_style = sorted({k for r in raw for k in r if k != "step" and not KEY_STYLE.fullmatch(k)})
    assert off_style == [], f"{algo}: metric names off the group/name style: {off_style}"
    if algo == "reinforce_pp":  # trainer.loggers: [jsonl, wandb]
        assert not (runs / algo / "tb").exists()
        sent = [{k: r[k] for k in ("_step", "reward/mean", "loss/total")} for r in history(runs)]
        assert sent == [{"_step": r["step"], "reward/mean": r["reward/mean"],
                         "loss/total": r["loss/total"]} for r in recs]
    else:
        assert any((runs / algo / "tb").iterdir())  # TensorBoard events
    assert (runs / algo / "checkpoints" / "2" / "policy").is_dir()


@pytest.mark.slow
def test_same_rollouts_for_every_algorithm(runs):
    """Step 1 samples with identical params and seeds: only the loss differs between algos."""
    first = {a: read_metrics(runs / a)[0] for a in ALGOS}
    for k in ("reward/mean", "response_length/mean", "entropy/rollout"):
        assert len({first[a][k] for a in ALGOS}) == 1, {a: first[a][k] for a in ALGOS}
    # ... and the updates differ: the final policies are not all the same
    pols = {a: checkpoint_arrays(runs / a, 2) for a in ("flowrl", "grpo")}
    keys = [k for k in pols["flowrl"] if k.startswith("policy")]
    assert keys and any(not np.array_equal(pols["flowrl"][k], pols["grpo"][k]) for k in keys)
    train = checkpoint_arrays(runs / "flowrl", 2)
    assert any(k.startswith("train['params/z/") for k in train)  # Z_φ is checkpointed


@pytest.mark.slow
def test_run_dir_loads_as_a_model(runs):
    """OUT/checkpoints has the policy layout that load_model / convert read."""
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.checkpoint.load import load_model

    model, arch, _ = load_model(runs / "grpo", single_device_mesh())
    assert arch.vocab_size == 128 and arch.num_hidden_layers == 2
    saved = checkpoint_arrays(runs / "grpo", 2)
    emb = [v for k, v in saved.items() if k.startswith("policy") and "embed_tokens" in k]
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), emb[0])


# --------------------------------------------------------------------------- failing early


def _cfg(*extra):
    return load_config(None, toy_overrides("flowrl", 1) + list(extra))


@pytest.mark.parametrize("override,key", [
    ("trainer.micro_batch_size=3", "trainer.micro_batch_size"),
    ("algo.name=dpo", "algo.name"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("trainer.mini_batch_size=1000", "trainer.mini_batch_size"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every"),
    ("trainer.stepz=3", "trainer.stepz"),
])
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(override)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    rc = cli.main(["train", "--config", "/dev/null", "--out", str(tmp_path / "o"),
                   "--no-console", *toy_overrides("flowrl", 1), "optimizer.lr=-1"])
    assert rc == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unreachable_data_fails_before_compute(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    cfg = load_config(None, [
        "model.preset=tiny", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
        f"data.custom=[{{name: mine, path: {missing}}}]", "data.train=[mine]"])
    tr = Trainer(cfg, tmp_path / "out", console=False)
    with pytest.raises(ConfigError) as e:
        tr.run()
    assert "data.train" in str(e.value) and str(missing) in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_model_path_fails_before_compute(tmp_path):
    cfg = _cfg(f"model.path={tmp_path / 'no-model'}")
    with pytest.raises(ConfigError, match=r"model\.path"):
        Trainer(cfg, tmp_path / "out", task=ToyTask(), console=False).run()
    assert not (tmp_path / "out").exists()


def test_memory_check_refuses_before_allocating(tmp_path):
    cfg = load_config(None, toy_overrides("flowrl", 1, **{
        "model.preset": "qwen2.5-7b", "trainer.device_memory_gb": 2, "mesh.fsdp": -1}))
    with pytest.raises(ConfigError, match=r"trainer\.device_memory_gb"):
        Trainer(cfg, tmp_path / "out", task=ToyTask(), console=False).run()
    assert not (tmp_path / "out").exists()


def test_task_factory_from_config():
    from flowrl_jax.rl.task import task_from_config

    assert isinstance(task_from_config(_cfg()), ToyTask)
    with pytest.raises(ConfigError, match=r"task\.factory"):
        task_from_config(_cfg("task.factory=no_such_module:Thing"))


@pytest.mark.slow
def test_validation_scores_in_the_metrics(runs):
    recs = read_metrics(runs / "grpo")
    assert "val/toyval/reward" not in recs[0]  # validate_every=2
    assert -1.0 <= recs[1]["val/toyval/reward"] <= 1.0
    assert 0.0 <= recs[1]["val/toyval/accuracy"] <= 1.0


@pytest.mark.slow
def test_final_policy_exported_to_hf_without_z(runs):
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.checkpoint.load import load_model

    hf = runs / "flowrl" / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    model, arch, _ = load_model(hf, single_device_mesh())
    saved = checkpoint_arrays(runs / "flowrl", 2)
    emb = [v for k, v in saved.items() if k.startswith("policy") and "embed_tokens" in k]
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), emb[0])
    from safetensors import safe_open

    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            assert not [k for k in st.keys() if "z" in k.split(".")[0]]


@pytest.mark.slow
def test_config_file_is_saved_with_the_run(runs):
    saved = (runs / "ppo" / "config.yaml").read_text()
    assert "name: ppo" in saved
    assert json.loads((runs / "ppo" / "checkpoints" / "model.json").read_text())["arch"]["vocab_size"] == 128


@pytest.mark.parametrize("name,preset,devices,gb", [
    ("qwen2.5-0.5b-math", "qwen2.5-0.5b", 8, 15.75),   # TPU v5e-8 (the compiler's HBM figure)
    ("qwen2.5-1.5b-math", "qwen2.5-1.5b", 8, 15.75),
    ("qwen2.5-7b-math", "qwen2.5-7b", 32, 95.74),      # TPU v5p-64
    ("qwen2.5-32b-math", "qwen2.5-32b", 32, 95.74),
    ("r1-distill-qwen-7b-code", "deepseek-r1-distill-qwen-7b", 32, 95.74),
    ("baselines/qwen2.5-7b-math-ppo", "qwen2.5-7b", 32, 95.74),  # + critic model
])
def test_shipped_configs_load_and_fit_their_hardware(name, preset, devices, gb):
    from flowrl_jax.memory import GiB, estimate
    from flowrl_jax.mesh import resolve_axis_sizes

    cfg = load_config(f"{name}.yaml", ["model.path=null", f"model.preset={preset}"])
    assert cfg.trainer.mini_batch_size % cfg.trainer.micro_batch_size == 0
    if "math" in name:  # SPEC §5 recipe
        assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (512, 8)
        assert cfg.rollout.prompts_per_step * 8 // cfg.trainer.mini_batch_size == 16
        assert (cfg.algo.beta, cfg.algo.is_clip, cfg.optimizer.lr) == (15.0, "cap", 1e-6)
        assert (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (2048, 8192)
    else:
        assert (cfg.rollout.prompts_per_step, cfg.rollout.temperature) == (64, 0.6)
    hosts_of_4 = 4 if devices > 8 else None  # v5p: 4 chips per host, one sampler copy each
    est = estimate(cfg, cfg.model.arch, resolve_axis_sizes(cfg.mesh, devices), (gb * GiB, "spec"),
                   sampler_local_devices=hosts_of_4)
    assert est.fits(), est.table()


@pytest.mark.slow
def test_resuming_with_another_algorithm_is_refused_and_keeps_checkpoints(runs):
    from flowrl_jax.mesh import single_device_mesh

    before = sorted(p.name for p in (runs / "flowrl" / "checkpoints").iterdir())
    cfg = load_config(None, toy_overrides("grpo", 3))
    tr = Trainer(cfg, runs / "flowrl", task=ToyTask(), console=False, mesh=single_device_mesh())
    with pytest.raises(ConfigError, match=r"algo\.name.*'flowrl'"):
        tr.run()
    assert sorted(p.name for p in (runs / "flowrl" / "checkpoints").iterdir()) == before
    assert not (runs / "flowrl" / "checkpoints.corrupt").exists()
