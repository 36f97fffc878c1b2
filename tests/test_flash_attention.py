"""flash_attention (no-cache training path, custom backward) against independent references:
a float64 NumPy masked softmax (forward, central-difference gradients), jax.grad of the
plain full-mask attention (all gradients), and HF transformers' Qwen2 (logits, T > block)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _attention_ref import np_attention
from _ckpt_util import hf_logits, make_hf
from flowrl_jax.checkpoint.hf import load_hf
from flowrl_jax.mesh import single_device_mesh
from flowrl_jax.models import attention
from flowrl_jax.models.attention import flash_attention
from flowrl_jax.models.qwen2 import Numerics, attention_weights_mask, plain_attention


def _case(t, n, kh, seed, b=3, d=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, d))
    k = rng.normal(size=(b, t, kh, d))
    v = rng.normal(size=(b, t, kh, d))
    valid = np.ones((b, t), bool)
    valid[0, :11] = False  # left padding: rows 0..10 see no key at all
    valid[1, t - 5:] = False  # right padding
    w = rng.normal(size=(b, t, n, d))
    return q, k, v, valid, w


CASES = [(40, 4, 2, 16), (37, 2, 1, 8), (16, 2, 2, 16), (50, 6, 3, 64)]


@pytest.mark.parametrize("t,n,kh,block", CASES)
def test_forward_and_gradients_match_float64_reference(t, n, kh, block):
    q, k, v, valid, w = _case(t, n, kh, t)
    attn = jax.jit(flash_attention, static_argnames="block")
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out = attn(*f32, jnp.asarray(valid), block=block)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, valid), atol=2e-5)

    # gradients of a random projection, against float64 central differences of the reference
    f = lambda q_, k_, v_: jnp.sum(flash_attention(q_, k_, v_, jnp.asarray(valid),  # noqa: E731
                                                   block=block) * w)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*f32)
    args = [q, k, v]
    for which in range(3):
        for idx in [(0, 3, 0, 1), (0, 12, 0, 2), (1, t - 1, 0, 0), (2, t // 2, kh - 1, 7)]:
            if which == 0:
                idx = idx[:2] + (n - 1,) + idx[3:]
            eps = 1e-6
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[which][idx] += eps
            lo[which][idx] -= eps
            num = (np.sum(np_attention(*hi, valid) * w) - np.sum(np_attention(*lo, valid) * w)) / (2 * eps)
            np.testing.assert_allclose(float(grads[which][idx]), num, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-probs", "recomputed-probs"])
@pytest.mark.parametrize("t,n,kh,block", CASES)
def test_all_gradients_match_autodiff_of_plain_attention(t, n, kh, block, keep, monkeypatch):
    # both backward variants: probabilities kept from the forward, or recomputed from lse
    monkeypatch.setattr(attention, "FLASH_KEEP_PROBS_MAX", 2 ** 25 if keep else 0)
    q, k, v, valid, w = (jnp.asarray(x, jnp.float32) for x in _case(t, n, kh, t + 1))
    valid = valid.astype(bool)
    mask = attention_weights_mask(jnp.broadcast_to(jnp.arange(t), valid.shape), valid)

    def loss(fn):
        return jax.jit(jax.grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * w), argnums=(0, 1, 2)))

    ours = loss(lambda *a: flash_attention(*a, valid, block=block))(q, k, v)
    ref = loss(lambda *a: plain_attention(*a, mask))(q, k, v)
    for a, r in zip(ours, ref):
        assert float(jnp.max(jnp.abs(r))) > 0.1  # not trivially zero
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def test_model_with_flash_path_matches_transformers(tmp_path):
    # T = 80 > FLASH_BLOCK, attention="plain": the no-cache path runs flash_attention
    path, ref_model = make_hf(tmp_path / "m", kv=2, seed=3)
    model, _ = load_hf(path, single_device_mesh(), Numerics(attention="plain"))
    ids = np.random.default_rng(0).integers(0, 128, (2, 80))
    ours = np.asarray(jax.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))
    ref = hf_logits(ref_model, ids)
    assert np.abs(ref).max() > 1.0
    assert np.abs(ours - ref).max() <= 1e-4


def test_bfloat16_inputs_run_bf16_products_and_stay_close_to_float64():
    """On accelerators q/k/v arrive in bf16: the products then run in bf16 with float32
    accumulation (softmax statistics in float32). Output and gradients in bf16, within
    bf16-level error of the float64 reference; the products really are bf16 in the HLO."""
    t, n, kh, d = 40, 4, 2, 16
    q, k, v, valid, w = _case(t, n, kh, 11, d=d)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    # the reference sees the same bf16-rounded inputs
    q64, k64, v64 = (np.asarray(x, np.float64) for x in bf)
    out = jax.jit(flash_attention, static_argnames="block")(*bf, jnp.asarray(valid), block=16)
    assert out.dtype == jnp.bfloat16
    ref = np_attention(q64, k64, v64, valid)
    assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 1e-2

    f = lambda *a: jnp.sum(flash_attention(*a, jnp.asarray(valid), block=16).astype(jnp.float32)  # noqa: E731
                           * jnp.asarray(w, jnp.float32))
    grad_fn = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    grads = grad_fn(*bf)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(lambda *a: jnp.sum(plain_attention(
            *a, attention_weights_mask(jnp.broadcast_to(jnp.arange(t), (3, t)), jnp.asarray(valid)))
            * jnp.asarray(w, jnp.float32)), argnums=(0, 1, 2)))(
            *[jnp.asarray(x, jnp.float32) for x in (q64, k64, v64)])
    for g, r in zip(grads, ref_grads):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 2e-2
    # every product: bf16 operands, float32 result
    dots = [l.split(" : ")[-1] for l in grad_fn.lower(*bf).as_text().splitlines()
            if "stablehlo.dot_general" in l]
    assert dots and all(x.count("bf16>") == 2 and x.endswith("xf32>") for x in dots), dots[:3]
