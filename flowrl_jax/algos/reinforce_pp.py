"""REINFORCE++ (SPEC §4, veRL `compute_reinforce_plus_plus_outcome_advantage`): outcome
reward at the last token, optional per-token KL penalty to ref, discounted return (γ),
advantages whitened over all valid tokens of the batch, clipped surrogate."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from flowrl_jax.algos import common as C
from flowrl_jax.algos.base import Algorithm, Metrics, common_metrics, register
from flowrl_jax.algos.policy_gradient import (kl_penalty_uses_ref, policy_loss,
                                              valid_outcome_rewards)

Array = jax.Array


def discounted_returns(token_rewards: Array, mask: Array, gamma: float) -> Array:
    """G_t = r_t + γ G_{t+1} within each sequence; the running return resets on masked
    tokens (so nothing leaks across the end of a response)."""
    dt = C.compute_dtype(token_rewards)
    m = jnp.asarray(mask).astype(bool)
    r = jnp.where(m, token_rewards.astype(dt), 0.0)

    def step(running, xs):
        r_t, m_t = xs
        g = r_t + gamma * running
        return jnp.where(m_t, g, 0.0), g

    _, ret = lax.scan(step, jnp.zeros((r.shape[0],), dt), (r.T, m.T), reverse=True)
    return jnp.where(m, ret.T, 0.0)


@register("reinforce_pp")
class ReinforcePP(Algorithm):
    """REINFORCE++: critic-free, batch-whitened discounted returns."""

    needs_z = False
    needs_critic = False
    needs_ref = False

    @classmethod
    def uses_ref(cls, cfg: Any) -> bool:
        """Ref log-probs are needed only for the optional KL penalty."""
        return kl_penalty_uses_ref(cfg)

    @classmethod
    def advantages(cls, batch: Mapping[str, Array], cfg: Any) -> dict[str, Array]:
        """Discounted returns of the (KL-penalised) outcome reward, whitened over the batch."""
        mask, tok = valid_outcome_rewards(batch, cfg, "reinforce_pp.advantages")
        ret = discounted_returns(tok, mask, cfg.gamma)
        return {"advantages": C.masked_whiten(ret, mask), "returns": ret}

    @classmethod
    def loss(cls, cfg: Any, batch: Mapping[str, Array],
             outputs: Mapping[str, Array]) -> tuple[Array, Metrics]:
        """Clipped surrogate on the whitened advantages."""
        pg, m, mask, valid = policy_loss(cfg, batch, outputs, "reinforce_pp.loss")
        m["loss"] = lax.stop_gradient(pg)
        m.update(common_metrics(batch, outputs, mask, valid))
        return pg, m
