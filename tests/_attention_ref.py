"""float64 NumPy attention reference shared by the attention tests."""

import numpy as np


def np_attention(q, k, v, valid):
    """Full [T, T] causal ∧ key-valid masked softmax in float64, GQA by repetition.
    q [B,T,N,D], k/v [B,T,KV,D], valid [B,T] bool."""
    b, t, n, d = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
    mask = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None, None] & valid[:, None, None, :]
    s = np.where(mask, s, -1e300)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)
