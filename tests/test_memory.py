"""Start-up memory estimate: parameter counts, per-device split, refusal with advice."""

import pytest

from flowrl_jax.config import ConfigError, load_config
import dataclasses

import jax
from flax import nnx

from flowrl_jax import memory as m
from flowrl_jax.memory import GiB, check_fits, estimate, paged_pool_bytes, z_param_count
from flowrl_jax.models.arch import param_count
from flowrl_jax.models.qwen2 import build_model


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_the_built_model(tied):
    arch = dataclasses.replace(load_config(None, ["model.preset=tiny"]).model.arch,
                               tie_word_embeddings=tied)
    params = nnx.state(build_model(arch), nnx.Param)
    assert param_count(arch) == sum(int(x.size) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("preset,expected", [("qwen2.5-0.5b", 494_032_768),
                                             ("qwen2.5-7b", 7_615_616_512)])
def test_param_count_of_published_models(preset, expected):
    # The published sizes of the HF checkpoints (safetensors metadata total).
    assert param_count(load_config(None, [f"model.preset={preset}"]).model.arch) == expected


def test_sharding_divides_static_memory():
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "trainer.device_memory_gb=1000"])
    one = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    eight = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 8, "tensor": 1})
    n = 7_615_616_512
    z = z_param_count(cfg, 3584)  # FlowRL's Z_φ: 2 × (3584² + 3·3584) + 3585, replicated
    assert z == 2 * (3584 ** 2 + 3 * 3584) + 3585
    assert one.params == (n + z) * 4 and one.optimizer == 2 * (n + z) * 4
    assert eight.params == n * 4 / 8 + z * 4 and eight.optimizer == 2 * 4 * (n / 8 + z)
    offload = load_config(None, ["model.preset=qwen2.5-7b", "trainer.ref_offload=true"])
    off = estimate(offload, offload.model.arch, {"fsdp": 8}, (1e12, "x"))
    assert off.ref == 0
    # offloaded, the reference comes onto the chips for its own log-prob pass only (32B on
    # v5p-64, session 11: logprobs_ref 20.23 GiB compiled, logprobs_old 16.22)
    assert off.ref_onload == n * 4 / 8
    assert off.program_bytes("logprobs_ref") == off.program_bytes("logprobs_old") + n * 4 / 8
    assert eight.ref_onload == 0 and eight.program_bytes("logprobs_ref") == eight.logprobs


def test_refuses_a_config_that_cannot_fit_with_advice():
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "mesh.fsdp=1",
                             "trainer.device_memory_gb=16"])
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    msg = str(e.value)
    assert "trainer.device_memory_gb" in msg and "mesh.fsdp" in msg and "bfloat16" in msg


def test_tiny_model_fits():
    # at the code default lengths (2,048 + 8,192) eight rows of attention scores alone are
    # GiBs whatever the model; the tiny model trains at short lengths
    cfg = load_config(None, ["model.preset=tiny", "trainer.device_memory_gb=4",
                             "data.max_prompt_length=256", "rollout.max_new_tokens=512"])
    est = check_fits(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    assert 0 < est.total < 4 * GiB and "total" in est.table()


def test_multi_host_sampler_copy_and_cache_on_one_host():
    """Multi-host: each host samples its share of the requests with its own copy of the
    policy, its KV cache sharded over that host's chips only (not the whole slice)."""
    cfg = load_config(None, ["model.preset=qwen2.5-32b", "trainer.device_memory_gb=1000",
                             "rollout.kv_cache=dense"])
    shape = {"data": 1, "fsdp": 32, "tensor": 1}
    single = estimate(cfg, cfg.model.arch, shape)
    pod = estimate(cfg, cfg.model.arch, shape, sampler_local_devices=4)
    assert single.sampler_params == 0
    assert pod.sampler_params == param_count(cfg.model.arch) * 4 / 4
    # 256 slots (decode_slots) × 10240 positions × 64 layers × K, V × 8 heads × 128, float32
    per_slot = 10240 * 64 * 2 * 8 * 128 * 4
    assert single.kv_cache == 256 * per_slot / 32  # one host: slots over all 32 chips
    assert pod.kv_cache == 256 * per_slot / 4  # 8 hosts: each host's 256 slots over its 4
    assert pod.decode_temps > 0 and pod.sampling == pytest.approx(
        pod.static + pod.sampler_params + pod.kv_cache + pod.decode_temps)
    assert pod.total == max(pod.train, pod.logprobs, pod.sampling) == pod.sampling


def test_program_peaks():
    """Each `flowrl-jax check` program maps to its phase's peak; the train step's
    activations grow with the micro-batch, the sampling peak with the decode slots."""
    base = ["model.preset=qwen2.5-0.5b", "trainer.device_memory_gb=16", "rollout.kv_cache=dense"]
    shape = {"data": 1, "fsdp": 8, "tensor": 1}
    small = load_config("configs/qwen2.5-0.5b-math.yaml", [*base, "trainer.micro_batch_size=8",
                                                           "rollout.decode_slots=256"])
    big = load_config("configs/qwen2.5-0.5b-math.yaml", [*base, "trainer.micro_batch_size=16",
                                                         "rollout.decode_slots=512"])
    a, b = (estimate(c, c.model.arch, shape) for c in (small, big))
    assert a.program_bytes("train_step") == a.train < b.train
    assert a.program_bytes("logprobs_ref") == a.logprobs == b.logprobs
    assert a.program_bytes("sampler_decode") == a.sampling < b.sampling
    assert b.kv_cache == 2 * a.kv_cache


def test_asynchronous_rollouts_add_the_sampler_on_top_of_training():
    """trainer.staleness >= 1 samples while the trainer works on the same chips: two policy
    copies (the one sampling, the next pushed) and the KV cache come on top of the train
    step's peak instead of alternating with it."""
    base = ["model.preset=qwen2.5-7b", "trainer.device_memory_gb=1000", "rollout.kv_cache=dense"]
    shape = {"data": 1, "fsdp": 8, "tensor": 1}
    on, off = (load_config(None, [*base, f"trainer.staleness={k}"]) for k in (0, 1))
    a, b = (estimate(c, c.model.arch, shape) for c in (on, off))
    n = param_count(on.model.arch)
    assert a.roles == "alternate" and a.sampler_params == 0
    assert b.roles == "overlap" and b.sampler_params == 2 * n * 4 / 8
    assert b.kv_cache == a.kv_cache and b.decode_temps == a.decode_temps
    assert b.total == pytest.approx(max(b.train, b.logprobs) + b.sampler_params + b.kv_cache
                                    + b.decode_temps)
    assert b.total > a.total == max(a.train, a.logprobs, a.sampling)
    assert "sampling overlaps" in b.table() and "sampler copy" in b.table()


def test_a_sampler_sub_mesh_holds_its_copy_and_cache_not_the_train_state():
    """rollout.devices: the sampler's chips hold one policy copy and the KV cache split over
    them (fsdp only); the trainer's chips hold the train state; the peak is the larger."""
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "trainer.device_memory_gb=1000",
                             "rollout.kv_cache=dense", "rollout.devices=2"])
    shared = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 8, "tensor": 1})
    split = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 6, "tensor": 1}, sampler_devices=2)
    assert split.roles == "split" and split.sampler_params == param_count(cfg.model.arch) * 4 / 2
    assert split.kv_cache == pytest.approx(shared.kv_cache * 8 / 2)  # the same slots on 2 chips
    assert split.sampling == pytest.approx(split.sampler_params + split.kv_cache
                                           + split.decode_temps)  # no train state there
    assert split.total == max(split.train, split.logprobs, split.sampling)


def test_paged_pool_as_the_engine_sizes_it():
    """The paged pool per chip: `rollout.kv_cache_gib` (whole pages), else a share of the free
    memory the chips report, else the engine's default; at most every slot's full length
    plus the null page; one block of whole pages per slot shard, kv heads split over
    `tensor`."""
    cfg = load_config(None, ["model.preset=qwen2.5-0.5b", "model.compute_dtype=bfloat16"])
    arch = cfg.model.arch  # 24 layers, 2 kv heads × 64: 24 × 2 × 2 × 64 × 2 B per position
    page = 64 * 24 * 2 * 2 * 64 * 2
    full = (256 * (10240 // 64) + 1) * page
    assert paged_pool_bytes(cfg, arch, 256, 10240, 1, free=None) == (4 * GiB // page) * page
    assert paged_pool_bytes(cfg, arch, 256, 10240, 1, free=1e12) == full  # capped
    assert paged_pool_bytes(cfg, arch, 256, 10240, 2, free=10 * GiB) == \
        int(0.8 * 10 * GiB * 2 // page) * page / 2
    gib1 = load_config(None, ["model.preset=qwen2.5-0.5b", "model.compute_dtype=bfloat16",
                              "rollout.kv_cache_gib=1"])
    assert paged_pool_bytes(gib1, arch, 256, 10240, 1, free=1e12) == (GiB // page) * page
    assert paged_pool_bytes(gib1, arch, 1, 64, 1, free=None) == 2 * page  # 1 page + null
    # over 8 slot shards: each chip holds its block, 1/8 of the pool's whole pages
    assert paged_pool_bytes(gib1, arch, 256, 10240, 1, free=None, slot_shards=8) == \
        (GiB // page // 8) * page
    assert paged_pool_bytes(cfg, arch, 256, 10240, 2, free=GiB, slot_shards=8) == \
        int(0.8 * GiB * 2 * 8 // page // 8) * page / 2  # a share of each chip's free memory
    assert paged_pool_bytes(cfg, arch, 256, 10240, 1, free=1e12, slot_shards=8) == \
        (256 // 8 * (10240 // 64) + 1) * page  # capped: a shard's slots + its null page
    # the estimate's sampling peak counts the pool per chip: the slots' 8 shards split it
    shape = {"data": 1, "fsdp": 8, "tensor": 1}
    est = estimate(gib1, arch, shape, (16 * GiB, "x"), platform="tpu")
    assert est.kv_cache == (GiB // page // 8) * page
    # on TPU decoding adds pool copies and, with 64-wide heads (half the TPU's 128 lanes),
    # copies of one layer's gathered rows (2 kv heads × 64 × 10,240 positions × 32 slots per
    # chip, keys + values, bf16); admitting, the prefill's 4 layers of whole float32 weights
    # (no logits: the prefill computes none) and the insert's pool copies
    rows = 2 * 2 * 64 * 10240 * 32 * 2
    layers4 = 4 * 14_912_384 * 4  # 4 layers' float32 weights (the layer count rounded)
    assert est.decode_temps == pytest.approx(m.PAGED_POOL_COPIES * est.kv_cache
                                             + m.PAGED_ROW_COPIES * rows
                                             + 3 * 256 / 8 * 151936 * 4 + layers4, rel=1e-5)
    assert est.prefill_temps == pytest.approx(layers4, rel=1e-5)
    assert est.admit_temps == pytest.approx(layers4 + m.ADMIT_POOL_COPIES * est.kv_cache,
                                            rel=1e-5)
    # each program its own peak: here decoding is the sampling peak
    assert est.program_bytes("sampler_decode") == est.sampling > est.program_bytes("sampler_admit")
    assert est.program_bytes("sampler_decode") == pytest.approx(
        est.static + est.kv_cache + est.decode_temps)
    assert est.program_bytes("sampler_admit") == pytest.approx(
        est.static + est.kv_cache + est.admit_temps)
    # the prefill and the insert, each with its part of admitting (the pool resident)
    assert est.program_bytes("sampler_prefill") == pytest.approx(
        est.static + est.kv_cache + layers4, rel=1e-6)
    assert est.program_bytes("sampler_insert") == pytest.approx(
        est.static + est.kv_cache + m.ADMIT_POOL_COPIES * est.kv_cache)
    cpu = estimate(gib1, arch, shape, (16 * GiB, "x"), platform="cpu")
    assert cpu.admit_temps == 0 and cpu.decode_temps < est.decode_temps
    assert cpu.program_bytes("sampler_prefill") == cpu.sampling  # no own figure off TPU


def test_paged_terms_with_heads_as_wide_as_the_tpu_lanes():
    """With 128-wide heads (Qwen2.5-7B) the TPU compiler's paged decode keeps fewer pool
    copies and no gathered rows; on a v5p the admit program's insert copies no pool (session
    11: 7B, 16 GiB per chip on v5p-64: decode 26.32 GiB of temporaries, admit 4.28), on
    another or an unknown chip fewer copies than with narrow heads (1.5B on v5e-8: 1.5)."""
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "model.compute_dtype=bfloat16",
                             "rollout.kv_cache=paged", "rollout.kv_cache_gib=64",
                             "rollout.decode_slots=512", "rollout.prompts_per_step=512",
                             "rollout.samples_per_prompt=8", "rollout.paged_attention=xla"])
    arch = cfg.model.arch
    assert arch.resolved_head_dim == 128 == m.SPLASH_LANES
    shape = {"data": 2, "fsdp": 16, "tensor": 1}
    est = estimate(cfg, arch, shape, (95 * GiB, "x"), sampler_local_devices=4, platform="tpu",
                   tpu_generation="v5p")
    assert est.kv_cache == pytest.approx(16 * GiB, rel=1e-3)  # 64 GiB over a host's 4 chips
    layer = (param_count(arch) - 2 * 152064 * 3584) / 28 * 4  # float32, untied embeddings
    # 512 slots per host over 4 chips: 128 slots' float32 logits, 3 buffers
    assert est.decode_temps == pytest.approx(
        m.PAGED_WIDE_POOL_COPIES * est.kv_cache + 3 * 128 * 152064 * 4 + 4 * layer)
    assert est.admit_temps == est.prefill_temps == pytest.approx(4 * layer)
    assert est.program_bytes("sampler_insert") == pytest.approx(
        est.static + est.sampler_params + est.kv_cache)
    v5e = estimate(cfg, arch, shape, (95 * GiB, "x"), sampler_local_devices=4, platform="tpu")
    assert v5e.decode_temps == est.decode_temps
    assert v5e.admit_temps == pytest.approx(4 * layer + m.ADMIT_WIDE_POOL_COPIES * est.kv_cache)
    # the log-prob pass's fixed part is the chip's: 6 bytes per token and hidden unit on v5p,
    # 38 elsewhere (one row per chip here: the default 16 per micro-batch over 32 chips)
    assert v5e.logprob_activations - est.logprob_activations == pytest.approx(
        1 * (2048 + 8192) * 3584 * (m.SPLASH_FORWARD_WORK - m.SPLASH_V5P_FORWARD_WORK))


def test_the_pallas_kernel_decodes_without_pool_copies():
    """`rollout.paged_attention: auto` runs the Pallas kernel on TPU for 128-wide heads: the
    decode reads the pool in place (session 11, 7B on v5p-64: 4.50 GiB of temporaries against
    the xla path's 26.32), so its estimate drops the pool copies and nothing else; 64-wide
    heads (Qwen2.5-0.5B) stay on the xla path, and so does the CPU."""
    over = ["model.preset=qwen2.5-7b", "model.compute_dtype=bfloat16", "rollout.kv_cache=paged",
            "rollout.kv_cache_gib=64", "rollout.decode_slots=512", "rollout.prompts_per_step=512"]
    shape, budget = {"data": 2, "fsdp": 16, "tensor": 1}, (95 * GiB, "x")
    est = {choice: estimate(load_config(None, over + [f"rollout.paged_attention={choice}"]),
                            load_config(None, over).model.arch, shape, budget,
                            sampler_local_devices=4, platform="tpu", tpu_generation="v5p")
           for choice in ("auto", "xla", "pallas")}
    assert est["auto"] == est["pallas"]
    assert est["xla"].decode_temps - est["auto"].decode_temps == pytest.approx(
        m.PAGED_WIDE_POOL_COPIES * est["auto"].kv_cache)
    assert est["xla"].admit_temps == est["auto"].admit_temps
    cfg = load_config(None, over)
    assert m.paged_kernel_runs(cfg, cfg.model.arch, "tpu")
    assert not m.paged_kernel_runs(cfg, cfg.model.arch, "cpu")
    narrow = load_config(None, ["model.preset=qwen2.5-0.5b", "rollout.kv_cache=paged"])
    assert not m.paged_kernel_runs(narrow, narrow.model.arch, "tpu")  # head_dim 64


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unrolled"])
def test_splash_attention_on_tpu_replaces_the_score_tiles(scanned):
    """On TPU (`model.attention: auto`) the train step and log-prob pass run splash
    attention: no [heads, T, T] score tiles, the fitted per-layer terms instead; elsewhere
    the blocked (flash) attention's tiles are counted as before. Under remat the unrolled
    layers keep splash's fitted per-layer residue, the scanned ones the layer input."""
    cfg = load_config("configs/qwen2.5-0.5b-math.yaml",
                      ["model.path=null", "model.preset=qwen2.5-0.5b",
                       "trainer.device_memory_gb=16", f"model.scan_layers={str(scanned).lower()}"])
    arch, shape = cfg.model.arch, {"data": 1, "fsdp": 8, "tensor": 1}
    assert m.attention_kernel(cfg, "tpu") == "splash" and m.attention_kernel(cfg, "cpu") == "flash"
    tpu, cpu = (estimate(cfg, arch, shape, platform=p) for p in ("tpu", "cpu"))
    h, i, L, seq = 896, 4864, 24, 2048 + 8192
    rows = 8 / 8  # micro-batch 8 over 8 chips, remat on
    layer = (param_count(arch) - 151936 * h) / L * 4  # one layer's float32 weights (tied)
    tiles = m.attention_tiles(arch, rows, seq, 1, m.ATTN_BACKWARD_TILES)
    # scanned: a layer keeps its bfloat16 input (2 bytes), the loop more gathered layers
    tpu_keep, gathered = ((2, m.SCAN_GATHERED_LAYERS) if scanned
                          else (m.SPLASH_REMAT_KEEP, m.SPLASH_GATHERED_LAYERS))
    keep = rows * seq * L * (m.REMAT_KEEP - tpu_keep) * h
    assert cpu.activations - tpu.activations == pytest.approx(
        keep + tiles - rows * seq * m.SPLASH_BACKWARD_WORK * h - gathered * layer)
    lp_rows = cfg.trainer.logprob_micro_batch_size / 8
    # narrow heads: a per-layer term, unrolled only (the scan reuses one layer's buffers)
    assert arch.resolved_head_dim == 64 < m.SPLASH_LANES
    per_layer = 0 if scanned else L * m.SPLASH_NARROW_FORWARD_KEEP
    assert cpu.logprob_activations - tpu.logprob_activations == pytest.approx(
        m.attention_tiles(arch, lp_rows, seq, 1, m.ATTN_FORWARD_TILES)
        + lp_rows * seq * (m.MLP_KEEP * i + m.PLAIN_KEEP * h)
        - lp_rows * seq * h * (m.SPLASH_FORWARD_WORK + per_layer)
        - m.SPLASH_FORWARD_GATHERED_LAYERS * layer)
    assert i == arch.intermediate_size and L == arch.num_hidden_layers
