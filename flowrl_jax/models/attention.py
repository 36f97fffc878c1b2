"""Causal self-attention for the no-cache (training / scoring) path, with a hand-written
backward pass (FlashAttention-2 style, blocked over query rows).

Why: differentiating a softmax attention with autodiff keeps several [B, N, T, T] float32
tensors alive between forward and backward (scores, mask selects, probabilities) and
walks them many times; on CPU that memory traffic, not the FLOPs, is most of a small
model's train step. Here the forward keeps the output, one log-sum-exp per query row and,
while they are small (FLASH_KEEP_PROBS_MAX), the causal blocks' probabilities, which it
materialises anyway for P·V (about half of one [B, N, T, T] tensor); beyond that the
backward recomputes each block's probabilities from the log-sum-exp. Query blocks attend
only keys [0, end of block) (a static loop: blocks above the diagonal are never computed),
and GQA is handled by folding the G query heads of a KV head into the rows of one matmul
(K/V are never repeated).

Layout inside: q as [B, KV, T·G, D] (row r = position r // G, head r % G of the group), k
and v as [B, KV, T, D], so every block is a batched matmul over (B, KV) with no transposes.
dK and dV are produced transposed ([D, T]): XLA:CPU runs products shaped like P^T·Q
(contraction over a big tile's rows into a [keys, D] result) several times slower than the
transposed form (measured 1.4 ms vs 0.2 ms for [8, 128, 512] × [8, 128, 16]).
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from flowrl_jax.mesh import current_platform

Array = jax.Array

#: query positions per block (T = 512 → 8 blocks; measured on CPU, see bench train)
FLASH_BLOCK = 64
#: at most this many query blocks (bounds the unrolled HLO for long sequences)
FLASH_MAX_BLOCKS = 16
#: keep the forward's probabilities for the backward (instead of recomputing them) while
#: they total at most this many float32 elements per call (2^25: 128 MiB)
FLASH_KEEP_PROBS_MAX = 2 ** 25
#: additive bias of a padded key: finite (exp underflows to exactly 0, no inf − inf NaN)
_MASKED = -1e30


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
    block = max(block, -(-t // FLASH_MAX_BLOCKS))
    return [(s, min(s + block, t)) for s in range(0, t, block)]


def _mm(spec: str, a: Array, b: Array) -> Array:
    """A product in the operands' dtype (q/k/v's: bf16 on accelerators, where the matrix
    units want it) accumulated and returned in float32, as FlashAttention does."""
    dt = b.dtype
    return jnp.einsum(spec, a.astype(dt), b, preferred_element_type=jnp.float32)


def _scores(qb: Array, k: Array, bias: Array, s0: int, e: int, g: int) -> Array:
    """Masked float32 scores of query positions [s0, e) against keys [0, e): [B, KV, (e−s0)·G, e]."""
    pos = s0 + jnp.arange((e - s0) * g) // g  # query position of each row
    s = _mm("bkrd,bksd->bkrs", qb, k[:, :, :e])
    causal = jnp.arange(e)[None, :] <= pos[:, None]
    return jnp.where(causal, s + bias[:, None, None, :e], _MASKED)


def _forward(q: Array, k: Array, v: Array, bias: Array, g: int, block: int):
    """q [B,KV,T·G,D] (pre-scaled), k/v [B,KV,T,D], bias [B,T] → out [B,KV,T·G,D] and lse
    [B,KV,T·G] in float32, and per block the unnormalised probabilities p [B,KV,rows,e] and
    1/Σp [B,KV,rows,1]."""
    t = k.shape[2]
    outs, lses, probs = [], [], []
    for s0, e in _blocks(t, block):
        s = _scores(q[:, :, s0 * g:e * g], k, bias, s0, e, g)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        outs.append(_mm("bkrs,bksd->bkrd", p, v[:, :, :e]) / l)
        lses.append((m + jnp.log(l))[..., 0])
        probs.append((p, 1.0 / l))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2), probs


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q: Array, k: Array, v: Array, bias: Array, g: int, block: int, keep: bool) -> Array:
    return _forward(q, k, v, bias, g, block)[0]


def _flash_fwd(q, k, v, bias, g, block, keep):
    out, lse, probs = _forward(q, k, v, bias, g, block)
    return out, (q, k, v, bias, out, lse, probs if keep else None)


def _flash_bwd(g, block, keep, res, dout):
    q, k, v, bias, out, lse, probs = res
    t = k.shape[2]
    # D_r = Σ_d dO·O: the softmax Jacobian's row term, one number per query row
    delta = jnp.sum(dout * out, axis=-1)
    dqs = []
    dkt = jnp.zeros(k.shape[:2] + (k.shape[3], t), jnp.float32)  # [B, KV, D, T]
    dvt = jnp.zeros_like(dkt)
    for i, (s0, e) in enumerate(_blocks(t, block)):
        rows = slice(s0 * g, e * g)
        qb, dob = q[:, :, rows], dout[:, :, rows]
        if probs is None:  # recompute the normalised probabilities from lse
            p = jnp.exp(_scores(qb, k, bias, s0, e, g) - lse[:, :, rows, None])
            dob_p = dob
        else:  # kept unnormalised p: fold 1/Σp into ds and into dO's rows for dV
            p, inv_l = probs[i]
            dob_p = dob * inv_l
        dp = _mm("bkrd,bksd->bkrs", dob, v[:, :, :e])
        ds = p * (dp - delta[:, :, rows, None])
        if probs is not None:
            ds = ds * inv_l
        dqs.append(_mm("bkrs,bksd->bkrd", ds, k[:, :, :e]))
        # dK, dV come out transposed ([D, keys]): XLA:CPU runs P^T·Q-shaped products
        # (contraction over the big tile's rows into a [keys, D] result) several times slower
        pad = ((0, 0), (0, 0), (0, 0), (0, t - e))
        dkt = dkt + jnp.pad(_mm("bkrd,bkrs->bkds", qb, ds.astype(qb.dtype)), pad)
        dvt = dvt + jnp.pad(_mm("bkrd,bkrs->bkds", dob_p.astype(qb.dtype), p.astype(qb.dtype)), pad)
    dq = jnp.concatenate(dqs, axis=2)
    return (dq.astype(q.dtype), dkt.swapaxes(2, 3).astype(k.dtype),
            dvt.swapaxes(2, 3).astype(v.dtype), jnp.zeros_like(bias))


_flash.defvjp(_flash_fwd, _flash_bwd)


def sees_a_key(k_valid: Array) -> Array:
    """[B, T] bool: query slot i sees at least one valid key j <= i (O(T); a cumsum lowers
    to an O(T²) reduce-window on CPU)."""
    t = k_valid.shape[1]
    first = jnp.min(jnp.where(k_valid, jnp.arange(t), t), axis=1, keepdims=True)
    return jnp.arange(t)[None, :] >= first


def flash_attention(q: Array, k: Array, v: Array, k_valid: Array, block: int = FLASH_BLOCK) -> Array:
    """Causal self-attention without a cache (query i is slot i), exact, custom backward.

    q [B,T,N,D], k/v [B,T,KV,D], k_valid [B,T] bool (False on padding). Same result as the
    full [T, T] masked softmax (`qwen2.plain_attention` with the causal ∧ valid mask),
    including rows that see no key at all (left padding): those get the uniform average of
    v over all T slots, as the full masked softmax gives them.
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    g = n // kh
    dt = q.dtype
    # products run in the inputs' dtype (bf16 on accelerators) with float32 accumulation;
    # softmax statistics, probabilities and the output stay float32
    qf = (q.astype(jnp.float32) * (d ** -0.5)).astype(dt).reshape(b, t, kh, g, d)
    qf = qf.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, d)
    kf = k.transpose(0, 2, 1, 3)
    vf = v.transpose(0, 2, 1, 3)
    bias = jnp.where(k_valid, 0.0, _MASKED).astype(jnp.float32)
    # materialise the re-laid-out inputs once: otherwise XLA fuses their producers (RoPE,
    # transposes) into every block's slice and recomputes them per block
    qf, kf, vf, bias = jax.lax.optimization_barrier((qf, kf, vf, bias))
    keep = b * kh * g * t * (t + block) // 2 <= FLASH_KEEP_PROBS_MAX
    out = _flash(qf, kf, vf, bias, g, block, keep)  # [B, KV, T·G, D]
    out = out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)
    # a query with no visible key: the full masked softmax is uniform over all T slots
    seen = sees_a_key(k_valid)
    v_mean = jnp.repeat(jnp.mean(vf.astype(jnp.float32), axis=2), g, axis=1)  # [B, N, D]
    out = jnp.where(seen[:, :, None, None], out, v_mean[:, None])
    return out.astype(dt)


# --------------------------------------------------------------------------- fused kernels


def _on_nvidia_gpu() -> bool:
    # the mesh's platform, not the host's backend: `check` compiles for TPUs on a CPU host
    return current_platform() in ("gpu", "cuda")


def _half(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def no_cache_kernel(impl: str, dtype) -> str:
    """The attention of a no-cache (train / scoring) pass for `model.attention = impl` and
    compute `dtype`: "fused" (`contiguous_causal_attention`), "flash" (`flash_attention`,
    exact for any mask, memory O(T)), "splash" (JAX's Pallas TPU kernel, models/splash.py)
    or "softmax" (the full masked [T, T] softmax).

    "auto": splash when the program runs on TPU (the mesh's platform), fused on NVIDIA GPUs
    in 16-bit (cuDNN; 4.9× XLA's softmax at the Qwen2.5-1.5B
    train shape on an H200, same error; BUILD_NOTES.md), else flash: on CPU it is the fastest
    (2.96× XLA at T 1024), and elsewhere a materialised [T, T] softmax does not fit at long
    context (12 heads × 8k² float32 = 3 GiB per layer and sequence)."""
    if impl == "cudnn":
        return "fused"
    if impl == "splash":
        return "splash"
    if impl == "auto":
        if current_platform() == "tpu":
            return "splash"
        return "fused" if _on_nvidia_gpu() and _half(dtype) else "flash"
    return "flash" if impl == "plain" else "softmax"


def fused_kernel_for(dtype) -> str:
    """jax.nn.dot_product_attention's implementation for these inputs: cuDNN's fused
    (FlashAttention-style) kernel on NVIDIA GPUs in 16-bit, else XLA's."""
    return "cudnn" if _half(dtype) and _on_nvidia_gpu() else "xla"


@jax.custom_vjp
def rotate(x: Array, by: Array) -> Array:
    """Row b of x [B, T, ...] rotated left by by[b] along T (out[b, i] = x[b, (i + by[b]) % T]).
    A permutation, so its gradient is the opposite rotation: a gather (autodiff of the
    forward gather would emit a scatter-add, which GPUs run with atomics)."""
    t = x.shape[1]
    idx = (jnp.arange(t, dtype=jnp.int32)[None, :] + by[:, None]) % t
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _rotate_fwd(x, by):
    return rotate(x, by), by


def _rotate_bwd(by, g):
    return rotate(g, -by), None


rotate.defvjp(_rotate_fwd, _rotate_bwd)


def contiguous_causal_attention(q: Array, k: Array, v: Array, k_valid: Array,
                                implementation: str | None = None) -> Array:
    """Causal self-attention without a cache for rows whose real tokens form one contiguous
    run [s, s + n): a left-padded prompt followed by its right-padded response, the layout
    of every train and scoring batch (`require_contiguous_rows` checks it on the host).

    Fused kernels mask by causality plus per-row lengths, i.e. runs that start at slot 0.
    Each row is rotated left by s so its run starts at 0, attended with
    `is_causal=True, *_seq_lengths=n`, and rotated back: for queries in the run this equals
    the causal ∧ valid-key mask. Queries on padding get the kernel's value for padded rows
    (cuDNN: zeros); nothing downstream reads them. q [B,T,N,D], k/v [B,T,KV,D], k_valid [B,T].
    """
    valid = k_valid.astype(bool)
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)  # 0 for an all-padding row
    length = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.int32), 1)
    args = (rotate(q, start), rotate(k, start), rotate(v, start))
    kw = dict(is_causal=True, query_seq_lengths=length, key_value_seq_lengths=length)
    kernel = implementation or fused_kernel_for(q.dtype)
    try:
        out = jax.nn.dot_product_attention(*args, **kw, implementation=kernel)
    except (ValueError, NotImplementedError, RuntimeError) as e:
        if kernel == "xla" or implementation is not None:
            raise
        # a shape or cuDNN version the fused kernel refuses (checked when tracing): same
        # function through XLA, said once per traced shape
        warnings.warn(f"cuDNN attention unavailable for q{tuple(q.shape)} {q.dtype} ({e}); "
                      f"using XLA's", RuntimeWarning, stacklevel=2)
        out = jax.nn.dot_product_attention(*args, **kw, implementation="xla")
    return rotate(out, -start)


def require_contiguous_rows(mask, where: str, first_row: int = 0) -> None:
    """Host-side check of the layout `contiguous_causal_attention` relies on: each row's
    real tokens are one run (no padding between prompt and response). `first_row`: the
    global index of mask's first row (for a shard of a larger batch)."""
    m = np.asarray(mask).astype(bool)
    n = m.sum(axis=1)
    first = np.argmax(m, axis=1)
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
    bad = np.nonzero((n > 0) & (last - first + 1 != n))[0]
    if bad.size:
        raise ValueError(f"{where}: attention_mask row {first_row + int(bad[0])} has padding between real "
                         f"tokens; the fused attention (model.attention='cudnn', or 'auto' on "
                         f"GPU) needs one contiguous run per row (left-padded prompt ++ "
                         f"right-padded response); set model.attention='xla' for other masks")
