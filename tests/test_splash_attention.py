"""Splash attention (models/splash.py): numerics in Pallas' interpret mode on CPU against a
float64 NumPy reference, the model's forward under a mesh (shard_map) against XLA's
attention, and the TPU compile (forward + backward) of a tiny model with
`model.attention: auto` on a described TPU slice holding the Pallas kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _attention_ref import np_attention
from flowrl_jax import cpu_runtime
from flowrl_jax.aot.topologies import get_slice, libtpu_available, slice_devices
from flowrl_jax.config import MeshConfig
from flowrl_jax.errors import ConfigError
from flowrl_jax.mesh import activation_sharding, compute_platform, make_mesh
from flowrl_jax.models.attention import no_cache_kernel
from flowrl_jax.models import qwen2
from flowrl_jax.models.qwen2 import Numerics, abstract_model
from flowrl_jax.models.splash import block_size, padded_length, segment_ids, splash_attention
from flowrl_jax.rl.train_state import abstract_tree
from flowrl_jax.testing import tiny_arch, tiny_model

HAVE_LIBTPU, NO_LIBTPU = libtpu_available()


@pytest.fixture(autouse=True)
def _quiet_libtpu():
    # other processes (tests, `check`) may hold libtpu: let this one load it too
    cpu_runtime.quiet_tpu_compiler_environment()


def _case(t, n, kh, d, seed):
    rng = np.random.default_rng(seed)
    b = 3
    q, w = rng.normal(size=(b, t, n, d)), rng.normal(size=(b, t, n, d))
    k, v = rng.normal(size=(b, t, kh, d)), rng.normal(size=(b, t, kh, d))
    valid = np.ones((b, t), bool)
    valid[0, :11] = False  # left-padded prompt ...
    valid[0, t - 7:] = False  # ... and right-padded response
    valid[1, 20:30] = False  # padding between real tokens: segment ids need no contiguity
    return q, k, v, valid, w * valid[:, :, None, None]  # padding queries are never read


def test_segment_ids_and_tiles():
    valid = jnp.asarray([[False, True, True, False], [True, True, True, True]])
    np.testing.assert_array_equal(segment_ids(valid, 6),
                                  [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    assert [padded_length(t) for t in (1, 128, 129, 10240)] == [128, 128, 256, 10240]
    assert [block_size(t) for t in (128, 256, 384, 1024, 10240)] == [128, 256, 128, 512, 512]


def test_kernel_choice_follows_the_mesh_platform():
    assert no_cache_kernel("splash", jnp.float32) == "splash"
    assert no_cache_kernel("auto", jnp.bfloat16) == "flash"  # a CPU program
    if HAVE_LIBTPU:
        # a one-chip slice (v5e-1 needs its own host bounds: checked here too)
        mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), slice_devices(get_slice("v5e-1")))
        with compute_platform(mesh):
            assert no_cache_kernel("auto", jnp.bfloat16) == "splash"
            assert no_cache_kernel("auto", jnp.float32) == "splash"
            assert no_cache_kernel("xla", jnp.float32) == "softmax"


def test_interpret_mode_matches_float64_reference():
    """Forward and gradients (GQA 4 heads / 2 kv heads, T 300 → 3 × 3 tiles of 128 with
    causal block skipping) on real queries equal the causal ∧ valid-key softmax."""
    t, n, kh, d = 300, 4, 2, 16
    q, k, v, valid, w = _case(t, n, kh, d, 0)
    mask = jnp.asarray(valid)

    def loss(q_, k_, v_):
        return jnp.sum(splash_attention(q_, k_, v_, mask) * w)

    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out, grads = jax.jit(lambda *a: (splash_attention(*a, mask), jax.grad(loss, (0, 1, 2))(*a)))(*f32)
    ref = np_attention(q, k, v, valid)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-5)
    args = [q, k, v]
    for which in range(3):
        for idx in [(0, 12, 0, 1), (0, 150, 1, 2), (1, 35, 1, 0), (2, t - 1, 0, 7), (2, 200, 1, 15)]:
            if which == 0:
                idx = idx[:2] + (n - 1 - idx[2],) + idx[3:]
            eps = 1e-6
            hi, lo = [a.copy() for a in args], [a.copy() for a in args]
            hi[which][idx] += eps
            lo[which][idx] -= eps
            num = (np.sum(np_attention(*hi, valid) * w) - np.sum(np_attention(*lo, valid) * w)) / (2 * eps)
            np.testing.assert_allclose(float(grads[which][idx]), num, atol=1e-4, rtol=1e-4)


def test_model_under_a_mesh_matches_xla_attention():
    """The model with `attention: splash` on a 2 (data) × 2 (tensor) CPU mesh: splash runs
    per device in a shard_map over batch and heads; logits on real tokens equal XLA's."""
    arch = tiny_arch()
    ref_model = tiny_model(arch, num=Numerics(attention="xla"))
    model = tiny_model(arch, num=Numerics(attention="splash"))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, arch.vocab_size, (4, 40)), jnp.int32)
    mask = np.ones((4, 40), bool)
    mask[0, :9], mask[2, 31:] = False, False
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])

    @jax.jit
    def logits(m, ids, mask):
        with activation_sharding(mesh):
            return m(ids, mask).logits

    want = np.asarray(logits(ref_model, ids, jnp.asarray(mask)))
    got = logits(model, ids, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not HAVE_LIBTPU, reason=NO_LIBTPU)
@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned-remat"])
def test_tpu_compile_uses_the_pallas_kernel(scanned, monkeypatch):
    """A tiny model's forward + backward with `attention: auto`, compiled ahead of time for
    a v5e 2×2 (data 2 × tensor 2), holds the Pallas TPU kernel (forward and backward), also
    inside the layer scan's loop under remat (the paper configs' setting)."""
    monkeypatch.setattr(qwen2, "UNROLL_MAX_LAYERS", 0)  # the loop deep stacks run
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), slice_devices(get_slice("v5e-4")),
                     whole_slice=True)
    num = Numerics(compute_dtype=jnp.bfloat16, attention="auto", scan_layers=scanned,
                   remat="full" if scanned else "none")
    graphdef, state = nnx.split(abstract_model(tiny_arch(), num))
    params = abstract_tree(state, mesh)
    batch = jax.ShapeDtypeStruct((4, 64), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))

    def loss(p, ids):
        with activation_sharding(mesh):
            out = nnx.merge(graphdef, p)(ids, ids > 0)
        return jnp.mean(out.logits.astype(jnp.float32) ** 2)

    # the tests' process-wide "highest" matmul precision (conftest) would ask Mosaic for fp32
    # passes on bf16 operands, which it rejects: said before compiling, naming the setting
    with activation_sharding(mesh), pytest.raises(ConfigError, match="matmul precision"):
        jax.jit(jax.grad(loss)).lower(params, batch)
    with activation_sharding(mesh), jax.default_matmul_precision("default"):
        text = jax.jit(jax.grad(loss)).lower(params, batch).compile().as_text()
    # forward, dq and dkv kernels per layer (2 layers unrolled; one scanned layer body)
    calls = text.count('custom_call_target="tpu_custom_call"')
    assert calls >= (3 if scanned else 6), calls
