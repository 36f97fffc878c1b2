"""PPO (SPEC §4): GAE(γ, λ) on the outcome reward at the last valid token, clipped
surrogate, clipped value loss. The critic is the train step's: this loss takes the
predicted values [B, T] (outputs['values']) and the rollout-time values (batch['old_values'])."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from flowrl_jax.algos import common as C
from flowrl_jax.algos.base import Algorithm, Metrics, cfg_get, common_metrics, register, token_arrays
from flowrl_jax.algos.policy_gradient import (kl_penalty_uses_ref, policy_loss,
                                              valid_outcome_rewards)

Array = jax.Array


def gae(token_rewards: Array, values: Array, mask: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation over valid tokens → (raw advantages, returns), [B, T].

    Masked positions are skipped: they neither bootstrap a value nor break the recursion,
    so V(s_{t+1}) is the value of the next *valid* token (0 past the end).
    """
    dt = C.compute_dtype(token_rewards, values)
    m = jnp.asarray(mask).astype(bool)
    r, v = token_rewards.astype(dt), values.astype(dt)
    b = r.shape[0]

    def step(carry, xs):
        next_v, last_gae = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        gae_t = delta + gamma * lam * last_gae
        next_v = jnp.where(m_t, v_t, next_v)
        last_gae = jnp.where(m_t, gae_t, last_gae)
        return (next_v, last_gae), last_gae

    init = (jnp.zeros((b,), dt), jnp.zeros((b,), dt))
    _, adv = lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = jnp.where(m, adv.T, 0.0)
    returns = jnp.where(m, adv + v, 0.0)
    return adv, returns


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float,
               agg_mode: str = "token-mean") -> tuple[Array, Metrics]:
    """½ · agg(max((V − R)², (clip(V, V_old ± clip) − R)²)) and its clip fraction."""
    dt = C.compute_dtype(values, old_values, returns)
    v, vo, ret = (C.zero_masked(x.astype(dt), mask) for x in (values, old_values, returns))
    v_clipped = jnp.clip(v, vo - clip, vo + clip)
    l1 = jnp.square(v - ret)
    l2 = jnp.square(v_clipped - ret)
    loss = 0.5 * C.aggregate(jnp.maximum(l1, l2), mask, agg_mode)
    return loss, {"vf_clip_frac": C.masked_mean((l2 > l1).astype(dt), mask),
                  "value_mean": C.masked_mean(lax.stop_gradient(v), mask)}


@register("ppo")
class PPO(Algorithm):
    """PPO with a learned critic and GAE advantages (whitened over the rollout batch)."""

    needs_z = False
    needs_critic = True
    needs_ref = False

    @classmethod
    def uses_ref(cls, cfg: Any) -> bool:
        """Ref log-probs are needed only for the optional in-reward KL penalty."""
        return kl_penalty_uses_ref(cfg)

    @classmethod
    def advantages(cls, batch: Mapping[str, Array], cfg: Any) -> dict[str, Array]:
        """GAE advantages (whitened over all valid tokens of the batch) and returns."""
        where = "ppo.advantages"
        mask, tok = valid_outcome_rewards(batch, cfg, where)
        (old_values,) = token_arrays(batch, ("old_values",), mask.shape, where)
        adv, ret = gae(tok, old_values, mask, cfg.gamma, cfg.lam)
        return {"advantages": C.masked_whiten(adv, mask), "returns": ret}

    @classmethod
    def loss(cls, cfg: Any, batch: Mapping[str, Array],
             outputs: Mapping[str, Array]) -> tuple[Array, Metrics]:
        """pg_loss + vf_coef · clipped value loss."""
        where = "ppo.loss"
        pg, m, mask, valid = policy_loss(cfg, batch, outputs, where)
        (values,) = token_arrays(outputs, ("values",), mask.shape, where, "outputs")
        old_values, returns = token_arrays(batch, ("old_values", "returns"), mask.shape, where)
        vf, vm = value_loss(values, old_values, returns, mask, cfg.value_clip,
                            cfg_get(cfg, "loss_agg_mode", "token-mean"))
        loss = pg + cfg.vf_coef * vf
        m.update(vm)
        m["vf_loss"] = lax.stop_gradient(vf)
        m["loss"] = lax.stop_gradient(loss)
        m.update(common_metrics(batch, outputs, mask, valid))
        return loss, m
