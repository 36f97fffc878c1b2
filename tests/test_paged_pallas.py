"""Paged decode attention through JAX's Pallas kernels (models/paged_pallas.py,
`rollout.paged_attention: pallas`): the kernel layout's writes, both kernels in Pallas'
interpret mode on CPU against a float64 reference over the gathered pages and against the
XLA paged path, the kernel per device under a mesh, the whole sampler's greedy tokens, and
the sampler's decode chunk compiled ahead of time for a TPU slice holding the TPU kernel."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl_jax import cpu_runtime
from flowrl_jax.aot.programs import sampler_programs
from flowrl_jax.aot.topologies import get_slice, libtpu_available, slice_devices
from flowrl_jax.config import ConfigError, MeshConfig, RolloutConfig, load_config
from flowrl_jax.mesh import compute_platform, make_mesh
from flowrl_jax.models import paged_pallas
from flowrl_jax.models.decode import rope_table
from flowrl_jax.models.paged_decode import PagedCache, paged_attention as xla_paged_attention
from flowrl_jax.models.paged_decode import paged_decode_forward
from flowrl_jax.models.qwen2 import Numerics, abstract_model
from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
from flowrl_jax.testing import tiny_arch, tiny_model

HAVE_LIBTPU, NO_LIBTPU = libtpu_available()

# GQA (4 query heads on 2 kv heads), pages of 8, tables of 4 pages over a pool of 13
B, K, G, D, P, T, N = 3, 2, 2, 16, 8, 4, 13
TABLE = np.array([[3, 1, 7, 0], [12, 2, 5, 9], [4, 0, 0, 0]], np.int32)
LENGTHS = np.array([19, 32, 3], np.int32)  # a partly filled last page, all 4 pages, one page


def _case(bf16_values: bool = False):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, K, G, D)).astype(np.float32)
    kp, vp = (rng.normal(size=(K, N, P, D)).astype(np.float32) for _ in range(2))
    if bf16_values:  # the TPU kernel rounds keys and values to bfloat16
        kp, vp = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in (kp, vp))
    return q, kp, vp


def _reference(q, kp, vp):
    """float64 attention of each row's query over the first LENGTHS[b] positions of its pages."""
    out = np.zeros((B, K, G, D))
    for b in range(B):
        ks, vs = (np.concatenate([a[:, TABLE[b, t]] for t in range(T)], 1)[:, :LENGTHS[b]]
                  .astype(np.float64) for a in (kp, vp))
        s = np.einsum("kgd,ksd->kgs", q[b].astype(np.float64), ks) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), vs)
    return out


def _kernel_attention(q, kp, vp, **kw):
    pool = paged_pallas.KernelPagedCache(jnp.asarray(kp), jnp.asarray(vp))
    fn = jax.jit(lambda q_, pool_, t, n: paged_pallas.paged_attention(q_, pool_, t, n, **kw))
    return np.asarray(fn(jnp.asarray(q), pool, jnp.asarray(TABLE), jnp.asarray(LENGTHS)))


def test_auto_picks_the_kernels_on_tpu_and_gpu_where_they_fit():
    assert [paged_pallas.resolve("auto", p, 128, 64) for p in ("tpu", "gpu", "cpu")] == \
        ["pallas", "pallas", "xla"]
    assert paged_pallas.resolve("xla", "tpu", 128, 64) == "xla"
    assert paged_pallas.resolve("pallas", "cpu", 80, 24) == "pallas"  # interpret mode: tests
    # the TPU kernel's blocks need head_dim % 128 == 0 (Qwen2.5-0.5B has 64); Triton loads
    # need powers of two: auto falls back to xla, an explicit pallas names the constraint
    assert paged_pallas.resolve("auto", "tpu", 64, 64) == "xla"
    assert paged_pallas.resolve("auto", "gpu", 128, 48) == "xla"
    with pytest.raises(ValueError, match="head_dim a multiple of 128, got 64"):
        paged_pallas.resolve("pallas", "tpu", 64, 64)
    with pytest.raises(ValueError, match="page_size a power of two, got 48"):
        paged_pallas.resolve("pallas", "gpu", 128, 48)
    assert paged_pallas.kernel_for("tpu") == ("tpu", False)
    assert paged_pallas.kernel_for("gpu") == ("gpu", False)
    assert paged_pallas.kernel_for("cpu") == ("gpu", True)
    with pytest.raises(ValueError, match="paged_attention must be one of"):
        paged_pallas.resolve("magic", "tpu", 128, 64)
    RolloutConfig(paged_attention="pallas").validate()
    with pytest.raises(ConfigError, match="rollout.paged_attention"):
        RolloutConfig(paged_attention="splash").validate()


def test_kernel_layout_writes_are_the_xla_layout_transposed():
    """A prompt's pages (insert) and one decode token per row land where the XLA layout puts
    them, positions-major: kernel[k, page, col, d] == xla[page, k, d, col]."""
    rng = np.random.default_rng(2)
    xla = np.zeros((N, K, D, P), np.float32)
    kern = paged_pallas.KernelPagedCache(*(jnp.zeros((K, N, P, D), jnp.float32),) * 2)
    pages = rng.normal(size=(3, K, D, P)).astype(np.float32)
    dest = np.array([4, 9, N], np.int32)  # the last one is out of range: dropped
    xla[dest[:2]] = pages[:2]
    kern = paged_pallas.write_pages(kern, jnp.asarray(dest), jnp.asarray(pages), jnp.asarray(pages))
    tok = rng.normal(size=(2, K, D)).astype(np.float32)
    page, col = np.array([9, 2], np.int32), np.array([5, 0], np.int32)
    for b in range(2):
        xla[page[b], :, :, col[b]] = tok[b]
    kern = paged_pallas.write_token(kern, jnp.asarray(tok), jnp.asarray(tok), jnp.asarray(page),
                                    jnp.asarray(col))
    want = xla.transpose(1, 0, 3, 2)
    np.testing.assert_array_equal(np.asarray(kern.k), want)
    np.testing.assert_array_equal(np.asarray(kern.v), want)
    assert (kern.page_size, kern.num_pages) == (P, N)


def test_gpu_kernel_interpreted_matches_float64_and_the_xla_path():
    """JAX's GPU paged-attention kernel (interpreted on CPU, the default off TPU/GPU): GQA,
    mixed lengths, several pages in table order, a partly filled last page."""
    q, kp, vp = _case()
    got = _kernel_attention(q, kp, vp)
    np.testing.assert_allclose(got, _reference(q, kp, vp), atol=2e-6, rtol=1e-5)
    # the XLA paged path over the same pages in its own layout
    xla_pool = PagedCache(*(jnp.asarray(a.transpose(1, 0, 3, 2)) for a in (kp, vp)))
    visible = (np.arange(T * P)[None, :] < LENGTHS[:, None])[:, None, None, :]
    xla = xla_paged_attention(jnp.asarray(q), xla_pool, jnp.asarray(TABLE), jnp.asarray(visible),
                              "matmul")
    np.testing.assert_allclose(got, np.asarray(xla), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block_positions", [16, 512], ids=["2-pages-per-block", "one-block"])
def test_tpu_kernel_interpreted_matches_float64(monkeypatch, block_positions):
    """JAX's TPU kernel (the one `auto` runs on TPU) in Pallas' TPU interpret mode, with the
    table read in compute blocks of 2 pages (blocks past a row's length skipped) or in one;
    values bfloat16-exact, since the kernel rounds keys and values to bfloat16."""
    monkeypatch.setattr(paged_pallas, "TPU_BLOCK_POSITIONS", block_positions)
    q, kp, vp = _case(bf16_values=True)
    got = _kernel_attention(q, kp, vp, kernel="tpu", interpret=True)
    np.testing.assert_allclose(got, _reference(q, kp, vp), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_idle_rows_pass_length_zero_and_come_out_zero(kernel):
    """An idle row (length 0, here the first: the TPU kernel's first DMA then starts at the
    next row) is skipped by both kernels and its output is 0; the other rows are unchanged."""
    q, kp, vp = _case(bf16_values=True)
    pool = paged_pallas.KernelPagedCache(jnp.asarray(kp), jnp.asarray(vp))
    lengths = LENGTHS.copy()
    lengths[0] = 0
    got = np.asarray(jax.jit(lambda q_, p_, t, n: paged_pallas.paged_attention(
        q_, p_, t, n, kernel=kernel, interpret=True))(
        jnp.asarray(q), pool, jnp.asarray(TABLE), jnp.asarray(lengths)))
    assert (got[0] == 0).all()
    np.testing.assert_allclose(got[1:], _reference(q, kp, vp)[1:], atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (GQA 4 / 2 heads, head_dim 16, 2 layers), built once (≈ 10 s here)."""
    arch = tiny_arch(128)
    return arch, tiny_model(arch, seed=0)


def test_decode_step_gives_idle_rows_length_zero(tiny):
    """The paged decode step with the kernels passes lengths pos + 1 for active rows and 0 for
    idle ones; the active rows' logits are those of the step where every row attends."""
    arch, model = tiny
    seen = []
    call = paged_pallas._call_kernel

    def recording(q, k, v, lengths, table, **kw):
        jax.debug.callback(lambda n: seen.append(np.asarray(n)), lengths)
        return call(q, k, v, lengths, table, **kw)

    rng = np.random.default_rng(3)
    shape = paged_pallas.kernel_pool_shape(arch, N, P)
    pools = [paged_pallas.KernelPagedCache(*(jnp.asarray(rng.normal(size=shape), jnp.float32)
                                             for _ in range(2)))
             for _ in range(arch.num_hidden_layers)]
    token, pos = jnp.array([5, 9, 17], jnp.int32), jnp.array([18, 31, 2], jnp.int32)
    page = jnp.asarray(TABLE[np.arange(B), np.asarray(pos) // P])
    active = jnp.array([True, False, True])

    def step(active_):
        return paged_decode_forward(model, token, pos, page, pools, jnp.asarray(TABLE),
                                    rope_table(arch, T * P), None, "matmul", "pallas",
                                    active=active_)[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paged_pallas, "_call_kernel", recording)
        run = jax.jit(step)  # one compile for both calls
        idle = np.asarray(run(active))
        every = np.asarray(run(jnp.ones((B,), bool)))
        jax.effects_barrier()
    n_layers = arch.num_hidden_layers
    assert sorted(n.tolist() for n in seen) == [[19, 0, 3]] * n_layers + [[19, 32, 3]] * n_layers
    np.testing.assert_array_equal(idle[[0, 2]], every[[0, 2]])


def test_kernel_per_device_under_a_mesh():
    """On a 2 (data) × 2 (tensor) CPU mesh the kernel runs per device in a shard_map over the
    rows and the kv heads (each shard whole GQA groups): the same numbers as one device."""
    q, kp, vp = _case()
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    qq = np.concatenate([q, q[:1]])  # 4 rows: divisible by the data axis
    table, lengths = np.concatenate([TABLE, TABLE[:1]]), np.concatenate([LENGTHS, LENGTHS[:1]])
    pool = paged_pallas.KernelPagedCache(jnp.asarray(kp), jnp.asarray(vp))

    @jax.jit
    def attend(q_, pool_, t, n):
        with compute_platform(mesh):
            return paged_pallas.paged_attention(q_, pool_, t, n)

    got = np.asarray(attend(jnp.asarray(qq), pool, jnp.asarray(table), jnp.asarray(lengths)))
    np.testing.assert_allclose(got[:B], _reference(q, kp, vp), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got[B], got[0], atol=1e-6)


def test_sampler_greedy_tokens_equal_with_pallas_and_xla(tiny):
    """The whole paged sampler, greedy, G = 2, mixed prompt lengths (pages of 8, prompts of 1
    to 2 pages and a partial one): the GPU kernel interpreted, per slot shard on a 2 (data)
    × 2 (tensor) mesh (the pool's pages split over data, its heads over tensor), gives the
    single-device XLA path's tokens and lengths, log-probs to float rounding."""
    _, model = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 1, 9, 17)]
    sp = SamplingParams(n=2, max_new_tokens=12, temperature=0.0, seed=1)
    kw = dict(decode_slots=8, decode_chunk=6, prefill_buckets=(32,), verbose=False,
              kv_cache="paged", page_size=8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    xla = SamplingEngine(model, paged_attention="xla", **kw)
    pallas = SamplingEngine(model, mesh=mesh, paged_attention="pallas", **kw)
    assert pallas.kernels.attention == "pallas" and xla.kernels.attention == "xla"
    assert SamplingEngine(model, **kw).kernels.attention == "xla"  # auto on CPU
    # the kernels' layout [kv_heads, pages, page, head_dim]: heads over tensor, the pages in
    # one block per slot shard (2 over data, 4 slots × 6 pages + a null page each)
    st = pallas.init_state(8, 48)
    assert st.pool[0].k.shape == (2, 2 * (4 * 6 + 1), 8, 16)
    assert tuple(st.pool[0].k.sharding.spec) == ("tensor", "data", None, None)
    ref = xla.generate(model, prompts, sp)
    got = pallas.generate(pallas.params_of(model), prompts, sp)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_gpu_kernel_lowers_for_cuda():
    """The GPU kernel lowered (not run) for CUDA on this CPU host at Qwen2.5-0.5B's attention
    shape (7 query heads per kv head, head_dim 64, pages of 64, a table of 10 pages): one
    Triton call. A page size that is not a power of two fails there, as `unsupported` says."""
    def lower(page_size):
        def f(q, k, v, t, n):
            return paged_pallas.paged_attention(q, paged_pallas.KernelPagedCache(k, v), t, n,
                                                kernel="gpu", interpret=False)
        sds = jax.ShapeDtypeStruct
        pool = sds((2, 41, page_size, 64), jnp.bfloat16)
        return jax.jit(f).trace(sds((4, 2, 7, 64), jnp.bfloat16), pool, pool,
                                sds((4, 10), jnp.int32), sds((4,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()

    assert lower(64).count("__gpu$xla.gpu.triton") == 1
    assert paged_pallas.unsupported("gpu", 64, 48) is not None
    with pytest.raises(ValueError, match="power of 2"):
        lower(48)


@pytest.mark.skipif(not HAVE_LIBTPU, reason=NO_LIBTPU)
def test_decode_chunk_compiles_for_tpu_with_the_paged_kernel():
    """The sampler's decode chunk of a small model (head_dim 128, bf16, pages of 16), with
    `rollout.paged_attention: auto`, compiled ahead of time for a v5e 2×2 (data 2 × tensor
    2): auto picks the kernel there, and the HLO holds its `tpu_custom_call`."""
    cpu_runtime.quiet_tpu_compiler_environment()
    cfg = load_config("configs/demo.yaml", [
        "model.arch=null", "model.preset=tiny", "model.compute_dtype=bfloat16",
        "data.max_prompt_length=16", "data.length_buckets=[16]",
        "rollout.prefill_buckets=[16]", "rollout.max_new_tokens=48", "rollout.decode_chunk=4",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.decode_slots=8",
        "trainer.mini_batch_size=8", "trainer.micro_batch_size=8",
        "rollout.kv_cache=paged", "rollout.page_size=16", "rollout.kv_cache_gib=0.01",
        "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"])
    # 8 query / 4 kv heads: 2 kv heads per chip, the case where the pool's layout matters
    arch = dataclasses.replace(cfg.model.arch, head_dim=128, num_attention_heads=8,
                               num_key_value_heads=4)
    mesh = make_mesh(cfg.mesh, slice_devices(get_slice("v5e-4")), whole_slice=True)
    (prog,) = sampler_programs(cfg, arch, mesh, lambda n: n == "sampler_decode", 1, 0)
    # the test session's "highest" matmul precision (conftest) makes Mosaic reject the
    # kernel's float32 × bfloat16 products: said before compiling, naming the setting
    with pytest.raises(ConfigError, match="matmul precision"):
        prog.lower()
    with jax.default_matmul_precision("default"):
        text = prog.lower().compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') >= arch.num_hidden_layers
    # the pool (per chip: 2 kv heads × pages × 16 × 128) stays in the kernel's layout: never
    # copied whole (the pool[:, pages] scatter form made the compiler copy it every step)
    pool = r"bf16\[2,\d+,16,128\]"
    assert re.search(pool, text) and not re.search(pool + r"\{[^}]*\} copy\(", text)
    # the tiny model's head_dim 16 does not fit the TPU kernel: auto keeps xla, pallas says why
    model = abstract_model(cfg.model.arch, Numerics.from_config(cfg.model))
    assert SamplingEngine(model, mesh=mesh, verbose=False).kernels.attention == "xla"
    with pytest.raises(SamplingError, match="head_dim a multiple of 128, got 16"):
        SamplingEngine(model, mesh=mesh, paged_attention="pallas", verbose=False)
