"""FlowRL: trajectory-balance loss with a learned partition function (SPEC §1).

    δ_i     = log Z_i + mean_t ℓθ − β r̂_i − mean_t ℓref        (means over valid tokens)
    log w_i = Σ_t m_t (ℓθ_t − ℓold_t)                            (sequence SUM, float32)
    w_i     = clip_mode(exp(clamp(sg(log w_i), ±log_w_clamp)))
    loss    = mean over valid sequences of w_i δ_i²

The paper's ablations are switches of `AlgoConfig` (defaults = the paper):
`importance_weight: one` sets w_i ≡ 1 ("w/o importance sampling"; not `is_clip: none`, which
is the unclipped weight); `length_norm: false` uses Σ_t instead of mean_t in δ;
`log_z: zero` fixes log Z_i ≡ 0 (no Z-network) and `log_z: scalar` makes it one learned
scalar shared by all prompts (models/znet.py).

The clamp (default ±20, so w ≤ e^20 ≈ 4.9e8 before the clip) keeps exp finite in float32
even for absurd log-ratios; with `cap`/`paper`/`asym` it never changes the final weight
unless |log w| > 20, where the clip would have cut it anyway. Padding sequences (no valid
token, or seq_mask = 0) are excluded from the mean and from every metric.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from flowrl_jax.algos import common as C
from flowrl_jax.algos.base import (Algorithm, Metrics, cfg_get, check_shape, common_metrics,
                                   register, require, response_mask, seq_valid, token_arrays)

Array = jax.Array
IS_CLIP_MODES = ("paper", "cap", "asym", "none")
IMPORTANCE_WEIGHTS = ("clipped", "one")
LOG_Z_MODES = ("network", "zero", "scalar")


def clip_importance_weight(w: Array, mode: str, eps_low: float = 0.2, eps_high: float = 0.28,
                           cap: float = 10.0) -> Array:
    """Apply the `is_clip` rule: paper clip(w, 1−ε, 1+ε); cap min(w, cap); asym clip(w, 1−ε,
    1+ε_high); none w. (`paper` uses eps_low on both sides.)"""
    if mode == "paper":
        return jnp.clip(w, 1.0 - eps_low, 1.0 + eps_low)
    if mode == "cap":
        return jnp.minimum(w, cap)
    if mode == "asym":
        return jnp.clip(w, 1.0 - eps_low, 1.0 + eps_high)
    if mode == "none":
        return w
    raise ValueError(f"algo.is_clip: unknown mode {mode!r} (expected one of {IS_CLIP_MODES})")


def flowrl_loss(logp: Array, old_logp: Array, ref_logp: Array, log_z: Array, rhat: Array,
                mask: Array, beta: float = 15.0, is_clip: str = "cap", clip_eps: float = 0.2,
                clip_eps_high: float = 0.28, is_cap: float = 10.0, log_w_clamp: float = 20.0,
                valid: Array | None = None, importance_weight: str = "clipped",
                length_norm: bool = True) -> tuple[Array, Metrics]:
    """The FlowRL loss of SPEC §1 on [B, T] log-probs, [B] log Z and r̂; returns (loss, metrics).

    `importance_weight="one"` sets w ≡ 1; `length_norm=False` puts the sequence sums of
    log πθ and log π_ref into δ instead of their per-token means (the ablations).
    """
    if importance_weight not in IMPORTANCE_WEIGHTS:
        raise ValueError(f"algo.importance_weight: unknown value {importance_weight!r} "
                         f"(expected one of {IMPORTANCE_WEIGHTS})")
    dt = C.compute_dtype(logp, old_logp, ref_logp, log_z, rhat)
    mask = jnp.asarray(mask).astype(dt)
    logp, old_logp, ref_logp = (x.astype(dt) for x in (logp, old_logp, ref_logp))
    log_z, rhat = log_z.astype(dt), rhat.astype(dt)
    n = jnp.sum(mask, axis=-1)
    if valid is None:
        valid = n > 0
    valid = valid & (n > 0)
    # per-token means (padding rows: no 0/0; they are masked out below), or plain sums
    norm = jnp.maximum(n, 1.0) if length_norm else jnp.ones_like(n)
    seq_logp = C.masked_sum(logp, mask, axis=-1) / norm
    seq_ref = C.masked_sum(ref_logp, mask, axis=-1) / norm
    delta = log_z + seq_logp - beta * rhat - seq_ref
    # select (not multiply) so NaN/inf in padding rows can reach neither loss nor gradient
    delta = jnp.where(valid, delta, 0.0)

    # importance weight: sequence-sum log-ratio in ≥ float32, no gradient, clamped before exp
    log_w_raw = lax.stop_gradient(C.masked_sum(logp - old_logp, mask, axis=-1))
    log_w_raw = jnp.where(valid, log_w_raw, 0.0)
    log_w = jnp.clip(log_w_raw, -log_w_clamp, log_w_clamp)
    w_unclipped = jnp.exp(log_w)
    if importance_weight == "one":  # the ablation: w ≡ 1, nothing is clipped
        w = jnp.ones_like(w_unclipped)
        clipped = jnp.zeros(w.shape, bool)
    else:
        w = clip_importance_weight(w_unclipped, is_clip, clip_eps, clip_eps_high, is_cap)
        clipped = (w != w_unclipped) | (log_w != log_w_raw)

    loss = C.masked_mean(w * jnp.square(delta), valid)
    d = lax.stop_gradient(delta)
    d_mean = C.masked_mean(d, valid)
    metrics: Metrics = {
        "loss": lax.stop_gradient(loss),
        "delta_mean": d_mean,
        "delta_std": jnp.sqrt(C.masked_mean(jnp.square(d - d_mean), valid)),
        "log_z_mean": C.masked_mean(lax.stop_gradient(log_z), valid),
        "w_mean": C.masked_mean(w, valid),
        "log_w_mean": C.masked_mean(log_w_raw, valid),
        "clip_frac": C.masked_mean(clipped.astype(dt), valid),
        "rhat_mean": C.masked_mean(rhat, valid),
    }
    return loss, metrics


@register("flowrl")
class FlowRL(Algorithm):
    """Reward-distribution matching: p ∝ π_ref · exp(β r̂) via trajectory balance with Z_φ."""

    needs_z = True
    needs_critic = False
    needs_ref = True

    @classmethod
    def loss_unit(cls, cfg: Any) -> str:
        """A mean over valid sequences, whatever loss_agg_mode says."""
        return "seqs"

    @classmethod
    def advantages(cls, batch: Mapping[str, Array], cfg: Any) -> dict[str, Array]:
        """r̂ over the whole rollout batch: group-normalised rewards (SPEC §3) when
        cfg.reward_norm == "group" (default), the raw reward when "none" (then the fixed point
        is exactly π_ref·exp(β r)/Z). Padding rows get 0."""
        where = "flowrl.advantages"
        mask = response_mask(batch, where)
        require(batch, ("rewards",), where)
        b = mask.shape[0]
        rewards = jnp.asarray(batch["rewards"])
        check_shape(rewards, (b,), "batch['rewards']", where)
        valid = seq_valid(batch, mask)
        norm = cfg_get(cfg, "reward_norm", "group")
        if norm == "none":
            return {"rhat": jnp.where(valid, rewards.astype(C.compute_dtype(rewards)), 0.0)}
        if norm != "group":
            raise ValueError(f"algo.reward_norm: unknown value {norm!r} (expected group or none)")
        require(batch, ("group_ids",), where)
        return {"rhat": C.group_normalize(rewards, batch["group_ids"], valid=valid)}

    @classmethod
    def loss(cls, cfg: Any, batch: Mapping[str, Array],
             outputs: Mapping[str, Array]) -> tuple[Array, Metrics]:
        """FlowRL TB loss (SPEC §1) plus logged metrics."""
        where = "flowrl.loss"
        mask = response_mask(batch, where)
        b, t = mask.shape
        (logp,) = token_arrays(outputs, ("logp",), (b, t), where, "outputs")
        old_logp, ref_logp = token_arrays(batch, ("old_logp", "ref_logp"), (b, t), where)
        require(batch, ("rhat",), where)
        log_z_mode = cfg_get(cfg, "log_z", "network")
        if log_z_mode not in LOG_Z_MODES:
            raise ValueError(f"algo.log_z: unknown value {log_z_mode!r} (expected one of "
                             f"{LOG_Z_MODES})")
        if log_z_mode == "zero":  # the ablation: log Z ≡ 0, there is no Z-network
            log_z = jnp.zeros((b,), jnp.float32)
        else:
            require(outputs, ("log_z",), where, "outputs")
            log_z = jnp.asarray(outputs["log_z"])
            if log_z.shape == (b, 1):
                log_z = log_z[:, 0]
            check_shape(log_z, (b,), "outputs['log_z']", where)
        rhat = jnp.asarray(batch["rhat"])
        check_shape(rhat, (b,), "batch['rhat']", where)
        valid = seq_valid(batch, mask)
        loss, m = flowrl_loss(
            logp, old_logp, ref_logp, log_z, rhat, mask,
            beta=cfg.beta, is_clip=cfg.is_clip, clip_eps=cfg.clip_eps,
            clip_eps_high=cfg_get(cfg, "clip_eps_high", 0.28), is_cap=cfg_get(cfg, "is_cap", 10.0),
            log_w_clamp=cfg_get(cfg, "log_w_clamp", 20.0), valid=valid,
            importance_weight=cfg_get(cfg, "importance_weight", "clipped"),
            length_norm=cfg_get(cfg, "length_norm", True))
        m.update(common_metrics(batch, outputs, mask, valid))
        return loss, m
