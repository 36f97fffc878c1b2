"""`model.remat`: the same values and gradients as without it, inside every JAX transform that
the trainer nests the model in (lax.map, lax.scan, a nested jit over params the outer jit
owns), and no recomputation in passes without a backward pass; with the layers scanned
(model.scan_layers, the default: unrolled inside the scan at this depth, and as the loop deep
stacks run) and unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flowrl_jax.models import qwen2
from flowrl_jax.models.qwen2 import Numerics, build_model
from flowrl_jax.testing import tiny_arch

ARCH = tiny_arch(64, hidden_size=32, intermediate_size=64)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 12)))


@pytest.fixture(scope="module", params=["scanned", "scanned-loop", "unrolled"])
def form(request):
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "scanned-loop":  # the loop of deep stacks (2 layers are unrolled)
            mp.setattr(qwen2, "UNROLL_MAX_LAYERS", 0)
        yield request.param


@pytest.fixture(scope="module")
def scanned(form):
    return form != "unrolled"


@pytest.fixture(scope="module")
def _split(scanned):
    def split(remat: bool):
        return nnx.split(build_model(ARCH, Numerics(remat=remat, scan_layers=scanned), seed=0))
    return split


def _loss(graphdef, params, ids, **kw):
    logits = nnx.merge(graphdef, params)(ids, **kw).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(logits ** 2)


@pytest.fixture(scope="module")
def plain_grads(_split):
    graphdef, params = _split(False)
    return jax.jit(jax.value_and_grad(lambda p: _loss(graphdef, p, IDS)))(params)


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_remat_gradient_equals_plain(plain_grads, _split):
    graphdef, params = _split(True)
    _assert_close(jax.jit(jax.value_and_grad(lambda p: _loss(graphdef, p, IDS)))(params),
                  plain_grads)


def test_remat_under_lax_scan_accumulation(plain_grads, _split):
    """Gradient accumulation over micro-batches in a scan, params closed over from outside."""
    graphdef, params = _split(True)

    @jax.jit
    def accumulate(params):
        def body(acc, ids):
            v, g = jax.value_and_grad(lambda p: _loss(graphdef, p, ids[None]))(params)
            return jax.tree.map(jnp.add, acc, (v, g)), None

        zero = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), params))
        acc, _ = lax.scan(body, zero, IDS)
        return jax.tree.map(lambda x: x / IDS.shape[0], acc)

    graphdef0, params0 = _split(False)
    want = jax.jit(jax.value_and_grad(
        lambda p: sum(_loss(graphdef0, p, IDS[i:i + 1]) for i in range(4)) / 4))(params0)
    _assert_close(accumulate(params), want)


def test_remat_forward_under_lax_map_and_nested_jit(_split):
    """The old/ref log-prob pass shape: lax.map over micro-batches inside the params' jit.
    `nnx.remat` failed here (TraceContextError: cannot mutate Param from a different trace)."""
    graphdef, params = _split(True)
    graphdef0, params0 = _split(False)

    @jax.jit
    def mapped(params, ids):
        inner = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids).logits)
        return lax.map(inner, ids.reshape(2, 2, -1)).reshape(4, 12, -1)

    want = nnx.merge(graphdef0, params0)(IDS).logits
    np.testing.assert_allclose(np.asarray(mapped(params, IDS)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)


def test_passes_without_backward_do_not_recompute(_split, scanned):
    """remat=False (what the log-prob pass and the sampler's prefill ask for) leaves no
    checkpoint in the program; the model's own setting puts one per layer (one in the scan
    body when the layers are scanned)."""
    graphdef, params = _split(True)

    def jaxpr(**kw):
        return str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(IDS, **kw).logits)(params))

    per_layer = 1 if scanned else ARCH.num_hidden_layers
    assert jaxpr().count("remat2[") == per_layer  # jax.checkpoint's primitive
    assert "remat2[" not in jaxpr(remat=False)
