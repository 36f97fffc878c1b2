"""The algorithm interface and its registry: a new algorithm is one file with `@register`
(imported in algos/__init__.py).

An algorithm is a class with class attributes saying what the trainer must provide and
two pure, jit-able class methods:

- `advantages(batch, cfg) -> dict`: run ONCE on the whole rollout batch (before it is
  split into mini-batches: group normalisation and whitening are batch statistics);
  returns new per-sequence/per-token arrays to merge into the batch.
- `loss(cfg, batch, outputs) -> (loss, metrics)`: run on every (micro-)batch inside the
  train step; `outputs` holds what the current parameters compute, with gradient.

The batch is a mapping of the arrays of a rollout batch, whose fields (shape, dtype,
meaning) are documented once, in `RolloutBatch` (rl/rollout_batch.py); here B sequences and
T response positions. `advantages` reads response_mask, old_logp, ref_logp (when
`uses_ref(cfg)`), rewards, group_ids, old_values (PPO) and seq_mask (optional; default:
response_mask has a 1) and returns rhat [B] / advantages [B, T] / returns [B, T]; `loss`
reads those and the rest.
Output keys: logp [B, T] (always), log_z [B] (needs_z), values [B, T] (needs_critic),
  entropy [B, T] (optional, only logged).

Metrics (scalars, stop-gradient): every algorithm logs loss, kl_old (k3 estimate of
KL(π_old‖πθ)), kl_ref (k3 of KL(πθ‖π_ref), when ref_logp is in the batch), response_length
(mean valid tokens per valid sequence), num_seqs, num_tokens, entropy (if given).
FlowRL adds delta_mean, delta_std, log_z_mean, w_mean, log_w_mean, clip_frac, rhat_mean;
the surrogate family adds pg_loss, pg_clip_frac, ratio_mean, adv_mean (+ pg_clip_frac_lower
with dual clip), GRPO kl_loss (use_kl_loss), PPO vf_loss, vf_clip_frac, value_mean.
Losses are means over the (micro-)batch given: each algorithm's `loss_unit(cfg)` says over
what ("tokens": its valid tokens, "seqs": its valid sequences), so the train step can weight
micro-batches to give exactly the loss of the whole mini-batch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import jax
import jax.numpy as jnp

from flowrl_jax.algos import common as C

Array = jax.Array
Metrics = dict[str, Array]
LossUnit = Literal["tokens", "seqs"]

_REGISTRY: dict[str, type["Algorithm"]] = {}


class Algorithm:
    """Base class of an RL objective; subclasses are used as classes, never instantiated."""

    name: ClassVar[str] = ""
    needs_z: ClassVar[bool] = False  # outputs must carry log_z [B] from Z_φ (SPEC §2)
    needs_critic: ClassVar[bool] = False  # outputs must carry values [B, T]; batch old_values
    needs_ref: ClassVar[bool] = False  # the loss always needs ref_logp (see uses_ref)

    @classmethod
    def uses_ref(cls, cfg: Any) -> bool:
        """Whether ref log-probs must be computed for this config (else they are optional)."""
        return cls.needs_ref

    @classmethod
    def loss_unit(cls, cfg: Any) -> LossUnit:
        """What `loss` averages over: valid "tokens" (token-mean) or valid "seqs" (seq-mean-*)."""
        return "tokens" if cfg_get(cfg, "loss_agg_mode", "token-mean") == "token-mean" else "seqs"

    @classmethod
    def advantages(cls, batch: Mapping[str, Array], cfg: Any) -> dict[str, Array]:
        """Per-rollout-batch preprocessing (group-normalised r̂, GAE, returns, ...)."""
        raise NotImplementedError

    @classmethod
    def loss(cls, cfg: Any, batch: Mapping[str, Array],
             outputs: Mapping[str, Array]) -> tuple[Array, Metrics]:
        """Scalar loss to minimise and a flat dict of scalar metrics."""
        raise NotImplementedError


def register(name: str):
    """Class decorator adding an `Algorithm` subclass to the registry under `name`."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register({name!r}) expects an Algorithm subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} is already registered by {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_algorithm(name: str) -> type[Algorithm]:
    """The registered algorithm class called `name`; a clear error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"algo.name: unknown algorithm {name!r} "
                         f"(registered: {', '.join(sorted(_REGISTRY))})") from None


def list_algorithms() -> list[str]:
    """Names of all registered algorithms."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- batch helpers


def require(d: Mapping[str, Array], keys: tuple[str, ...], where: str, what: str = "batch") -> None:
    """Raise a KeyError naming the algorithm and every missing key of `d`."""
    missing = [k for k in keys if k not in d or d[k] is None]
    if missing:
        raise KeyError(f"{where}: {what} is missing {missing} (has {sorted(d)})")


def check_shape(x: Array, shape: tuple[int, ...], name: str, where: str) -> None:
    """Raise a ValueError naming the tensor when `x` does not have `shape`."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def response_mask(batch: Mapping[str, Array], where: str) -> Array:
    """The [B, T] response mask as float32 (validated)."""
    require(batch, ("response_mask",), where)
    m = jnp.asarray(batch["response_mask"])
    if m.ndim != 2:
        raise ValueError(f"{where}: response_mask must be [B, T], got shape {m.shape}")
    return m.astype(jnp.float32)


def seq_valid(batch: Mapping[str, Array], mask: Array) -> Array:
    """[B] bool: sequences that count (≥ 1 valid token and not flagged by seq_mask)."""
    v = jnp.sum(mask, axis=-1) > 0
    if batch.get("seq_mask") is not None:
        v = v & jnp.asarray(batch["seq_mask"]).astype(bool)
    return v


def token_arrays(d: Mapping[str, Array], keys: tuple[str, ...], shape: tuple[int, int],
                 where: str, what: str = "batch") -> list[Array]:
    """Fetch [B, T] arrays, checking presence and shape."""
    require(d, keys, where, what)
    out = []
    for k in keys:
        x = jnp.asarray(d[k])
        check_shape(x, shape, f"{what}[{k!r}]", where)
        out.append(x)
    return out


def common_metrics(batch: Mapping[str, Array], outputs: Mapping[str, Array], mask: Array,
                   valid: Array) -> Metrics:
    """Logged by every algorithm: KL to old and ref (k3), response length, entropy."""
    logp = outputs["logp"]
    m: Metrics = {
        # KL(π_old‖πθ) from samples of π_old; KL(πθ‖π_ref) from (approximately) πθ samples
        "kl_old": C.masked_mean(jax.lax.stop_gradient(C.approx_kl(batch["old_logp"], logp, "k3",
                                                                  C.LOG_RATIO_CLAMP)), mask),
        "response_length": C.masked_mean(jnp.sum(mask, axis=-1), valid),
        "num_seqs": jnp.sum(valid.astype(jnp.float32)),
        "num_tokens": jnp.sum(mask),
    }
    if batch.get("ref_logp") is not None:
        m["kl_ref"] = C.masked_mean(jax.lax.stop_gradient(
            C.approx_kl(logp, batch["ref_logp"], "k3", C.LOG_RATIO_CLAMP)), mask)
    if outputs.get("entropy") is not None:
        m["entropy"] = C.masked_mean(jax.lax.stop_gradient(outputs["entropy"]), mask)
    return m


def cfg_get(cfg: Any, name: str, default: Any) -> Any:
    """A config field with a default, so older AlgoConfig objects keep working."""
    return getattr(cfg, name, default)
