"""The clipped policy-gradient surrogate shared by GRPO, PPO and REINFORCE++ (no registration)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flowrl_jax.algos import common as C
from flowrl_jax.algos.base import (Metrics, cfg_get, check_shape, require, response_mask,
                                   seq_valid, token_arrays)

Array = jax.Array


def surrogate_clip_range(cfg: Any) -> tuple[float, float]:
    """(ε_low, ε_high) of the PPO surrogate: clip_eps both sides unless surrogate_clip_high."""
    eps = cfg.clip_eps
    high = cfg_get(cfg, "surrogate_clip_high", None)
    return eps, (eps if high is None else high)


def policy_loss(cfg: Any, batch: Mapping[str, Array], outputs: Mapping[str, Array],
                where: str) -> tuple[Array, Metrics, Array, Array]:
    """Clipped surrogate on batch['advantages'] shared by GRPO, PPO and REINFORCE++.

    Returns (pg_loss, metrics, mask, valid).
    """
    mask = response_mask(batch, where)
    b, t = mask.shape
    (logp,) = token_arrays(outputs, ("logp",), (b, t), where, "outputs")
    old_logp, adv = token_arrays(batch, ("old_logp", "advantages"), (b, t), where)
    valid = seq_valid(batch, mask)
    mask = mask * valid[:, None]
    lo, hi = surrogate_clip_range(cfg)
    pg, m = C.clipped_surrogate(logp, old_logp, adv, mask, lo, hi,
                                dual_clip_c=cfg_get(cfg, "dual_clip_c", None),
                                agg_mode=cfg_get(cfg, "loss_agg_mode", "token-mean"))
    m["pg_loss"] = jax.lax.stop_gradient(pg)
    m["adv_mean"] = C.masked_mean(adv.astype(jnp.float32), mask)
    return pg, m, mask, valid


def outcome_token_rewards(batch: Mapping[str, Array], cfg: Any, mask: Array,
                          where: str) -> tuple[Array, Metrics]:
    """Token-level rewards [B, T]: the outcome reward on the last valid token, minus
    kl_penalty_coef · KL(π_old‖π_ref) per valid token (estimator `kl_penalty_type`, k1 by
    default, as veRL's in-reward penalty) when the coefficient is > 0."""
    rewards = jnp.asarray(batch["rewards"])
    tok = C.last_token_rewards(rewards, mask)
    metrics: Metrics = {}
    coef = float(cfg_get(cfg, "kl_penalty_coef", 0.0))
    if coef > 0:
        old_logp, ref_logp = token_arrays(batch, ("old_logp", "ref_logp"), mask.shape, where)
        kl = C.approx_kl(old_logp.astype(tok.dtype), ref_logp.astype(tok.dtype),
                         cfg_get(cfg, "kl_penalty_type", "k1"))
        kl = jnp.where(mask > 0, kl, 0.0)
        tok = tok - coef * kl
        metrics["kl_penalty"] = C.masked_mean(kl, mask)
    return tok, metrics


def valid_outcome_rewards(batch: Mapping[str, Array], cfg: Any, where: str) -> tuple[Array, Array]:
    """(mask [B, T] restricted to valid sequences, token rewards [B, T]) for the critic-style
    advantage estimators (PPO, REINFORCE++): checks `rewards`, then `outcome_token_rewards`."""
    mask = response_mask(batch, where)
    require(batch, ("rewards",), where)
    check_shape(jnp.asarray(batch["rewards"]), (mask.shape[0],), "batch['rewards']", where)
    mask = mask * seq_valid(batch, mask)[:, None]
    tok, _ = outcome_token_rewards(batch, cfg, mask, where)
    return mask, tok


def kl_penalty_uses_ref(cfg: Any) -> bool:
    """Ref log-probs are needed only for the optional in-reward KL penalty."""
    return float(cfg_get(cfg, "kl_penalty_coef", 0.0)) > 0
