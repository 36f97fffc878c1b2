"""causal_block_attention (no-cache training path) against an independent float64 NumPy
masked softmax attention, forward and gradients, with left/right padding and ragged blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl_jax.models.qwen2 import causal_block_attention


def _np_attention(q, k, v, valid):
    """float64 reference: full [T, T] causal ∧ key-valid masked softmax, GQA by repetition."""
    b, t, n, d = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
    mask = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None, None] & valid[:, None, None, :]
    s = np.where(mask, s, -1e300)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("t,n,kh,block", [(40, 4, 2, 16), (37, 2, 1, 8), (16, 2, 2, 16)])
def test_matches_float64_reference(t, n, kh, block):
    rng = np.random.default_rng(t)
    b, d = 3, 8
    q = rng.normal(size=(b, t, n, d))
    k = rng.normal(size=(b, t, kh, d))
    v = rng.normal(size=(b, t, kh, d))
    valid = np.ones((b, t), bool)
    valid[0, :11] = False  # left padding: rows 0..10 see no key at all
    valid[1, t - 5:] = False  # right padding
    w = rng.normal(size=(b, t, n, d))

    attn = jax.jit(causal_block_attention, static_argnames="block")
    out = attn(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(valid), block=block)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, valid), atol=2e-5)

    # gradients of a random projection, against float64 central differences of the reference
    f = lambda q_, k_, v_: jnp.sum(causal_block_attention(q_, k_, v_, jnp.asarray(valid),  # noqa: E731
                                                          block=block) * w)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    args = [q, k, v]
    for which in range(3):
        for idx in [(0, 3, 0, 1), (1, t - 1, 0, 0), (2, t // 2, kh - 1, d - 1)]:
            if which == 0:
                idx = idx[:2] + (n - 1,) + idx[3:]
            eps = 1e-6
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[which][idx] += eps
            lo[which][idx] -= eps
            num = (np.sum(_np_attention(*hi, valid) * w) - np.sum(_np_attention(*lo, valid) * w)) / (2 * eps)
            np.testing.assert_allclose(float(grads[which][idx]), num, atol=1e-4, rtol=1e-4)
