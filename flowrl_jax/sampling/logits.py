"""Logits → token: temperature, top-k / top-p / min-p filters, the draw, and the policy
log-prob of the drawn token."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.sampling.random import categorical_rows

Array = jax.Array


def sample_logits(logits: Array, keys: Optional[Array], spec: SamplingSpec,
                  noise: Optional[Array] = None) -> tuple[Array, Array]:
    """Sample one token per row of float32 logits [B, V] with raw keys [B, 2] (or their
    precomputed `gumbel_noise` [B, V]).

    Returns (tokens [B], logp [B]) where logp = log_softmax(logits / T)[token]: the policy's
    log-prob at the sampling temperature (what the trainer computes), not the truncated one.
    Filters (top-k, then top-p on the renormalised top-k distribution, then min-p) are chosen
    statically so the common T-only case does no sort.
    """
    if spec.temperature == 0.0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, token_logprob(logits, tok)
    scaled = logits / spec.temperature
    neg = jnp.finfo(jnp.float32).min
    filtered = scaled
    if spec.top_k > 0 and spec.top_k < logits.shape[-1]:
        top_vals = jax.lax.top_k(scaled, spec.top_k)[0]  # sorted descending
        filtered = jnp.where(scaled < top_vals[:, -1:], neg, filtered)
    else:
        top_vals = None
    if spec.top_p < 1.0:
        # Keep the smallest top set whose mass reaches top_p: a token stays if the mass of the
        # tokens strictly above it is < top_p. Sort only the top-k values when top-k is on.
        vals = top_vals if top_vals is not None else -jnp.sort(-filtered, axis=-1)
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < spec.top_p
        cutoff = jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where(filtered < cutoff, neg, filtered)
    if spec.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
        top = jnp.max(filtered, axis=-1, keepdims=True)
        filtered = jnp.where(filtered < top + math.log(spec.min_p), neg, filtered)
    tok = categorical_rows(keys, filtered, noise)
    return tok, token_logprob(scaled, tok)


def token_logprob(x: Array, tok: Array) -> Array:
    """log_softmax(x)[row, tok] for x [B, V], tok [B], without the [B, V] log-softmax: the same
    arithmetic as jax.nn.log_softmax: (x - max) - log(sum(exp(x - max)))."""
    m = jnp.max(x, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))
    return (jnp.take_along_axis(x, tok[:, None], axis=-1) - m)[:, 0] - lse
