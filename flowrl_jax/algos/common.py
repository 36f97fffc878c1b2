"""Shared pieces of every RL loss: log-probs, masked reductions, group normalisation, KL.

Everything here is pure and jit-able. Reductions run in at least float32 whatever the
input dtype (float64 inputs stay float64, which the tests use).

Shape conventions: B sequences, T response positions, H hidden size, V vocabulary.
A `mask` is [B, T] with 1 on valid response tokens (bool or float).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

#: clamp of per-token log-ratios before exp in the PPO-style ratio and k3 (as veRL does)
LOG_RATIO_CLAMP = 20.0
#: clamp of the per-token k3 value used as a *loss* (veRL's low_var_kl clamps to ±10)
K3_LOSS_CLAMP = 10.0
#: variance epsilon when whitening advantages (veRL masked_whiten)
WHITEN_EPS = 1e-8
#: std epsilon of the group normalisation (SPEC §3)
GROUP_NORM_EPS = 1e-6
#: stand-in for −inf on padded vocabulary columns (finite, so gradients stay NaN-free)
_NEG = -1e30


def compute_dtype(*xs: Array) -> jnp.dtype:
    """The dtype to compute in: the widest input float type, at least float32."""
    dt = jnp.float32
    for x in xs:
        if x is not None and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            dt = jnp.promote_types(dt, jnp.asarray(x).dtype)
    return dt


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: Array, mask: Array, axis: Optional[int | tuple[int, ...]] = None) -> Array:
    """Sum of `x` over positions where `mask` is set (masked entries may hold NaN/inf)."""
    mask = jnp.asarray(mask)
    return jnp.sum(jnp.where(mask.astype(bool), x, jnp.zeros((), x.dtype)), axis=axis)


def zero_masked(x: Array, mask: Array) -> Array:
    """x with masked-out entries replaced by 0 via select, so NaN/inf there cannot reach
    either the value or (through 0·NaN) the gradient of anything computed from it."""
    return jnp.where(jnp.asarray(mask).astype(bool), x, jnp.zeros((), x.dtype))


def masked_mean(x: Array, mask: Array, axis: Optional[int | tuple[int, ...]] = None) -> Array:
    """Mean of `x` over masked positions; 0 (not NaN) where the mask is empty."""
    mask = jnp.asarray(mask)
    count = jnp.sum(mask.astype(x.dtype), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of `x` over all masked positions (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(jnp.asarray(mask).astype(x.dtype))
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x − mean)/sqrt(var + 1e-8) with masked batch statistics (unbiased var); 0 off-mask."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return jnp.where(jnp.asarray(mask).astype(bool), out, 0)


def sequence_lengths(mask: Array) -> Array:
    """n_i = number of valid response tokens per sequence, [B] in the compute dtype."""
    return jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=-1)


def aggregate(loss_mat: Array, mask: Array, mode: str = "token-mean") -> Array:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: mean over all valid tokens of the batch (GRPO/PPO default);
    seq-mean-token-mean: mean over valid sequences of each sequence's token mean;
    seq-mean-token-sum: mean over valid sequences of each sequence's token sum.
    Sequences with no valid token are excluded from the seq-mean modes.
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    seq_valid = jnp.sum(jnp.asarray(mask).astype(jnp.int32), axis=-1) > 0
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, axis=-1)
    elif mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss_mat, mask, axis=-1)
    else:
        raise ValueError(f"algo.loss_agg_mode: unknown mode {mode!r} "
                         "(expected token-mean, seq-mean-token-mean or seq-mean-token-sum)")
    return masked_mean(per_seq, seq_valid)


# --------------------------------------------------------------------------- log-probs


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of softmax(logits) over the last axis, computed in ≥ float32."""
    z = logits.astype(compute_dtype(logits))
    logp = jax.nn.log_softmax(z, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_logprobs_from_logits(logits: Array, targets: Array, temperature: float = 1.0,
                               return_entropy: bool = False):
    """log softmax(logits / temperature)[targets] in ≥ float32: [B, T, V], [B, T] → [B, T].

    With `return_entropy` also returns the entropy of the tempered distribution [B, T].
    """
    z = logits.astype(compute_dtype(logits)) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    tgt = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = tgt - logz
    if not return_entropy:
        return logp
    p = jnp.exp(z - logz[..., None])
    ent = logz - jnp.sum(p * z, axis=-1)
    return logp, ent


def _chunk_logprobs_full_vocab(h: Array, w: Array, tgt: Array, temperature: float,
                               dt: jnp.dtype, entropy: bool = True) -> tuple[Array, Array]:
    """Log-probs and entropy for one sequence chunk with the whole vocabulary at once
    (entropy 0 without `entropy`: skips a [B, c, V] exp pass in the train step)."""
    z = jnp.einsum("bch,hv->bcv", h, w, preferred_element_type=dt).astype(dt) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    zt = jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0]
    if not entropy:
        return zt - logz, jnp.zeros_like(logz)
    p = jnp.exp(z - logz[..., None])
    return zt - logz, logz - jnp.sum(p * z, axis=-1)


def _chunk_logprobs_vocab_chunks(h: Array, w_chunks: Array, tgt: Array, temperature: float,
                                 dt: jnp.dtype, vocab_size: int) -> tuple[Array, Array]:
    """Same as the full-vocab version, scanning vocabulary chunks with an online logsumexp.

    w_chunks is [n, H, Vc] (zero-padded past `vocab_size`); padded columns are masked out.
    Running state per token: max m, s = Σ e^(z−m), u = Σ e^(z−m)·z, and the target logit.
    """
    n, _, vc = w_chunks.shape
    shape = tgt.shape

    def body(carry, xs):
        m, s, u, zt = carry
        i, wc = xs
        z = jnp.einsum("bch,hv->bcv", h, wc, preferred_element_type=dt).astype(dt) / temperature
        col = i * vc + jnp.arange(vc)
        # padded columns get a huge finite negative (not −inf: 0·inf would NaN the backward)
        z = jnp.where(col < vocab_size, z, _NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        s = s * scale + jnp.sum(e, axis=-1)
        u = u * scale + jnp.sum(e * z, axis=-1)
        local = tgt - i * vc
        hit = (local >= 0) & (local < vc)
        zt = zt + jnp.where(hit, jnp.take_along_axis(z, jnp.clip(local, 0, vc - 1)[..., None],
                                                     axis=-1)[..., 0], 0)
        return (m_new, s, u, zt), None

    # remat each vocab step too: the backward then keeps only the [B, c] carries per step,
    # not a [B, c, Vc] logits block per step (which would add up to [B, c, V])
    body = jax.checkpoint(body)
    init = (jnp.full(shape, _NEG, dt), jnp.zeros(shape, dt), jnp.zeros(shape, dt),
            jnp.zeros(shape, dt))
    (m, s, u, zt), _ = lax.scan(body, init, (jnp.arange(n), w_chunks))
    logz = m + jnp.log(s)
    return zt - logz, logz - u / s


def token_logprobs_from_hidden(hidden: Array, lm_head_w: Array, targets: Array,
                               temperature: float = 1.0, chunk_size: int = 1024,
                               vocab_chunk_size: Optional[int] = None,
                               return_entropy: bool = False):
    """Per-token log π(target) at `temperature` from final hidden states, chunked over T.

    hidden [B, T, H] (after the final norm, already aligned so that position t predicts
    targets[:, t]), lm_head_w [H, V] (the embedding matrix transposed for tied models),
    targets [B, T] int. Returns logp [B, T] (and the entropy [B, T] with `return_entropy`)
    in ≥ float32. The sequence is processed `chunk_size` positions at a time inside a
    lax.scan whose body is rematerialised (jax.checkpoint; skipped for a single chunk), so
    neither the forward nor the backward pass ever holds more than one [B, chunk, V] logits
    block; with
    `vocab_chunk_size` the vocabulary is also split (online logsumexp), bounding the block
    to [B, chunk, vocab_chunk]. The matmul accumulates in float32 from bf16 inputs.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden: expected [B, T, H], got shape {hidden.shape}")
    if lm_head_w.ndim != 2 or lm_head_w.shape[0] != hidden.shape[-1]:
        raise ValueError(f"lm_head_w: expected [H={hidden.shape[-1]}, V], got shape {lm_head_w.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets: expected shape {hidden.shape[:2]}, got {targets.shape}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    dt = compute_dtype(hidden, lm_head_w)
    b, t, hdim = hidden.shape
    v = lm_head_w.shape[1]
    c = min(chunk_size, t)
    n_chunks = -(-t // c)
    pad = n_chunks * c - t
    targets = targets.astype(jnp.int32)
    if pad:  # pad T up to a multiple of the chunk; padded positions are dropped below
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n_chunks, c, hdim).swapaxes(0, 1)  # [n, B, c, H]
    ts = targets.reshape(b, n_chunks, c).swapaxes(0, 1)  # [n, B, c]

    if vocab_chunk_size is None or vocab_chunk_size >= v:
        def chunk_fn(w, h, tg):
            return _chunk_logprobs_full_vocab(h, w, tg, temperature, dt, return_entropy)
        w_arg = lm_head_w
    else:
        vc = vocab_chunk_size
        nv = -(-v // vc)
        # one re-layout of W outside the sequence scan: [H, V] → [nv, H, vc]
        w_arg = jnp.pad(lm_head_w, ((0, 0), (0, nv * vc - v))).reshape(hdim, nv, vc).swapaxes(0, 1)

        def chunk_fn(w, h, tg):
            return _chunk_logprobs_vocab_chunks(h, w, tg, temperature, dt, v)

    # remat: the backward pass recomputes each chunk's logits instead of storing them. With
    # a single chunk there is nothing to save by it: the backward needs that one block
    # anyway (peak memory unchanged), so skip the second LM-head matmul.
    if n_chunks > 1:
        chunk_fn = jax.checkpoint(chunk_fn)

    def body(_, xs):
        h, tg = xs
        return None, chunk_fn(w_arg, h, tg)

    _, (lp, ent) = lax.scan(body, None, (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :t]
    if not return_entropy:
        return lp
    ent = ent.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :t]
    return lp, ent


# --------------------------------------------------------------------------- rewards


def group_ids_from_size(batch_size: int, group_size: int) -> Array:
    """Group ids [B] for a batch laid out as consecutive groups of `group_size`."""
    if group_size <= 0 or batch_size % group_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of group size {group_size}")
    return jnp.arange(batch_size, dtype=jnp.int32) // group_size


def dense_group_ids(group_ids) -> np.ndarray:
    """Host-side remap of arbitrary group keys (e.g. dataset prompt ids) to 0..n_groups−1."""
    _, inv = np.unique(np.asarray(group_ids), return_inverse=True)
    return inv.reshape(-1).astype(np.int32)


def _check_group_ids(group_ids: Array, num_groups: int) -> None:
    """Out-of-range ids would be silently dropped by segment_sum: refuse them when concrete."""
    if isinstance(group_ids, jax.core.Tracer):
        return
    g = np.asarray(group_ids)
    if g.size and (g.min() < 0 or g.max() >= num_groups):
        raise ValueError(f"group_ids: values must lie in [0, {num_groups}), got range "
                         f"[{g.min()}, {g.max()}]; remap with dense_group_ids()")


def group_normalize(rewards: Array, group_ids: Optional[Array] = None,
                    group_size: Optional[int] = None, valid: Optional[Array] = None,
                    eps: float = GROUP_NORM_EPS, num_groups: Optional[int] = None) -> Array:
    """r̂_i = (r_i − mean_group)/(std_group + eps), SPEC §3, over a flat [B] reward array.

    Groups come from `group_ids` [B] (ints in [0, num_groups), num_groups defaulting to B)
    or from a fixed `group_size` (consecutive blocks). std is unbiased (n − 1); a group of
    one member uses mean 0 and std 1 (so r̂ = r/(1 + eps)); a group whose rewards are all
    equal gives exactly 0. Members with `valid` = False (padding rows) do not count and get 0.
    """
    rewards = jnp.asarray(rewards)
    dt = compute_dtype(rewards)
    r = rewards.astype(dt)
    b = r.shape[0]
    if group_ids is None:
        if group_size is None:
            raise ValueError("group_normalize needs group_ids or group_size")
        group_ids = group_ids_from_size(b, group_size)
    group_ids = jnp.asarray(group_ids) if not isinstance(group_ids, jax.Array) else group_ids
    if group_ids.shape != (b,):
        raise ValueError(f"group_ids: expected shape ({b},), got {group_ids.shape}")
    ng = b if num_groups is None else num_groups
    _check_group_ids(group_ids, ng)
    vm = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
    r = jnp.where(vm, r, 0.0)  # a NaN reward on a padding row must not reach its group
    gid = group_ids.astype(jnp.int32)
    cnt = jax.ops.segment_sum(vm.astype(dt), gid, num_segments=ng)
    mean = jax.ops.segment_sum(r, gid, num_segments=ng) / jnp.maximum(cnt, 1)
    dev = jnp.where(vm, r - mean[gid], 0.0)
    std = jnp.sqrt(jax.ops.segment_sum(dev * dev, gid, num_segments=ng) / jnp.maximum(cnt - 1, 1))
    # all-equal test on max == min: r − mean can carry rounding noise (0.1 + 0.1 + 0.1 ...)
    gmax = jax.ops.segment_max(jnp.where(vm, r, -jnp.inf), gid, num_segments=ng)
    gmin = jax.ops.segment_min(jnp.where(vm, r, jnp.inf), gid, num_segments=ng)
    single = cnt[gid] <= 1
    mu = jnp.where(single, 0.0, mean[gid])
    sd = jnp.where(single, 1.0, std[gid])
    out = (r - mu) / (sd + eps)
    out = jnp.where(~single & (gmax[gid] == gmin[gid]), 0.0, out)
    return jnp.where(vm, out, 0.0)


def last_token_rewards(rewards: Array, mask: Array) -> Array:
    """Place each sequence's scalar reward [B] on its last valid token → [B, T] (0 elsewhere)."""
    mask = jnp.asarray(mask).astype(bool)
    t = mask.shape[-1]
    pos = jnp.where(mask, jnp.arange(t)[None, :], -1)
    last = jnp.max(pos, axis=-1)  # −1 for a sequence with no valid token
    dt = compute_dtype(rewards)
    onehot = (jnp.arange(t)[None, :] == last[:, None]) & (last[:, None] >= 0)
    return jnp.where(onehot, rewards.astype(dt)[:, None], 0).astype(dt)


# --------------------------------------------------------------------------- KL estimators


def approx_kl(logp_p: Array, logp_q: Array, kind: str = "k3",
              clamp: Optional[float] = None) -> Array:
    """Per-token estimate of KL(p‖q) from samples of p (Schulman's k1/k2/k3).

    With log r = log q − log p: k1 = −log r, k2 = ½ (log r)², k3 = e^{log r} − log r − 1
    (low-variance, ≥ 0). For the KL-to-ref penalty p = πθ and q = π_ref, so
    k3 = exp(ref − logp) − (ref − logp) − 1. `clamp` bounds log r before exp (overflow).
    """
    log_r = logp_q - logp_p
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    if kind == "k3":
        if clamp is not None:
            log_r = jnp.clip(log_r, -clamp, clamp)
        return jnp.exp(log_r) - log_r - 1.0
    raise ValueError(f"unknown KL estimator {kind!r} (expected k1, k2 or k3)")


def kl_loss_term(logp: Array, ref_logp: Array, kind: str = "k3") -> Array:
    """Per-token KL(πθ‖π_ref) penalty as veRL optimises it (k3 with ±20/±10 clamps)."""
    if kind == "k3":
        return jnp.clip(approx_kl(logp, ref_logp, "k3", clamp=LOG_RATIO_CLAMP),
                        -K3_LOSS_CLAMP, K3_LOSS_CLAMP)
    return approx_kl(logp, ref_logp, kind)


# --------------------------------------------------------------------------- PPO surrogate


def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array, mask: Array,
                      clip_low: float, clip_high: float, dual_clip_c: Optional[float] = None,
                      agg_mode: str = "token-mean") -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) aggregated over the mask.

    ρ = exp(clamp(logp − old_logp, ±20)). With `dual_clip_c` (> 1) the loss of tokens with
    A < 0 is additionally bounded by −c·A (dual-clip PPO). Returns (loss, metrics) with
    metrics pg_clip_frac (tokens where the clipped branch is taken), ratio_mean, kl_old (k1).
    """
    dt = compute_dtype(logp, old_logp, advantages)
    logp, old_logp, adv = (zero_masked(x.astype(dt), mask) for x in (logp, old_logp, advantages))
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(l1, l2)
    metrics = {"pg_clip_frac": masked_mean((l2 > l1).astype(dt), mask)}
    if dual_clip_c is not None:
        l3 = -adv * dual_clip_c
        pg = jnp.where(adv < 0, jnp.minimum(pg, l3), pg)
        metrics["pg_clip_frac_lower"] = masked_mean(((pg == l3) & (adv < 0)).astype(dt), mask)
    loss = aggregate(pg, mask, agg_mode)
    metrics["ratio_mean"] = masked_mean(lax.stop_gradient(ratio), mask)
    return loss, metrics
