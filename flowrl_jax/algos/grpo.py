"""GRPO (SPEC §4): advantage r̂ on every response token, PPO clipped surrogate, token-mean,
optional KL(πθ‖π_ref) loss with the k3 estimator (coefficient `kl_coef`, default 0.001)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flowrl_jax.algos import common as C
from flowrl_jax.algos.base import (Algorithm, Metrics, cfg_get, check_shape, common_metrics,
                                   register, require, response_mask, seq_valid, token_arrays)
from flowrl_jax.algos.policy_gradient import policy_loss

Array = jax.Array


@register("grpo")
class GRPO(Algorithm):
    """Group-relative policy optimisation (outcome reward, group-normalised advantage)."""

    needs_z = False
    needs_critic = False
    needs_ref = False

    @classmethod
    def uses_ref(cls, cfg: Any) -> bool:
        """Ref log-probs are needed only for the optional KL loss."""
        return bool(cfg_get(cfg, "use_kl_loss", False))

    @classmethod
    def advantages(cls, batch: Mapping[str, Array], cfg: Any) -> dict[str, Array]:
        """r̂ (SPEC §3) broadcast over every valid response token."""
        where = "grpo.advantages"
        mask = response_mask(batch, where)
        require(batch, ("rewards", "group_ids"), where)
        check_shape(jnp.asarray(batch["rewards"]), (mask.shape[0],), "batch['rewards']", where)
        valid = seq_valid(batch, mask)
        rhat = C.group_normalize(jnp.asarray(batch["rewards"]), jnp.asarray(batch["group_ids"]),
                                 valid=valid)
        adv = rhat[:, None] * mask
        return {"rhat": rhat, "advantages": adv, "returns": adv}

    @classmethod
    def loss(cls, cfg: Any, batch: Mapping[str, Array],
             outputs: Mapping[str, Array]) -> tuple[Array, Metrics]:
        """Clipped surrogate (+ kl_coef · token-mean k3 KL to ref when use_kl_loss)."""
        where = "grpo.loss"
        pg, m, mask, valid = policy_loss(cfg, batch, outputs, where)
        loss = pg
        if cfg_get(cfg, "use_kl_loss", False):
            (ref_logp,) = token_arrays(batch, ("ref_logp",), mask.shape, where)
            kl = C.kl_loss_term(C.zero_masked(outputs["logp"], mask), C.zero_masked(ref_logp, mask),
                                cfg_get(cfg, "kl_loss_type", "k3"))
            kl_loss = C.aggregate(kl, mask, cfg_get(cfg, "loss_agg_mode", "token-mean"))
            loss = loss + cfg.kl_coef * kl_loss
            m["kl_loss"] = jax.lax.stop_gradient(kl_loss)
        m["loss"] = jax.lax.stop_gradient(loss)
        m.update(common_metrics(batch, outputs, mask, valid))
        return loss, m
