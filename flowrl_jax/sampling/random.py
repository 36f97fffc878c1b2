"""The sampler's random draws, bit for bit those of jax.random (default threefry PRNG).

Key schedule: the key of the token generated at step t of sample s of prompt p is
fold_in(fold_in(fold_in(PRNGKey(seed), p), s), t) (`sample_keys`, then `step_keys`), so
samples do not depend on slot assignment; a draw is gumbel-max over those keys' uniform bits
(`categorical_rows`), as jax.random.categorical does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# Threefry, unrolled: jax lowers threefry2x32 on CPU as a rolled while loop (5 iterations, each a few kernels);
# inside the decode loop that costs ~0.3 ms per step for [32, 128] logits. The functions below
# compute the same hash with plain uint32 ops (one fusion) and reproduce, bit for bit,
# jax.random.fold_in and jax.random.categorical (default threefry, "low" gumbel mode) — the
# tests check both against jax.random.

_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: Array, d: int) -> Array:
    return (x << jnp.uint32(d)) | (x >> jnp.uint32(32 - d))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 hash (20 rounds) of counters (x1, x2) under key (k1, k2), broadcast."""
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x = [x1 + ks[0], x2 + ks[1]]
    for i in range(5):
        for r in _ROT[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ _rotl(x[1], r)
        x = [x[0] + ks[(i + 1) % 3], x[1] + ks[(i + 2) % 3] + jnp.uint32(i + 1)]
    return x[0], x[1]


def fast_threefry() -> bool:
    """Whether the unrolled functions match jax.random under the current config."""
    impl = jax.config.jax_default_prng_impl
    return (impl == "threefry2x32" and jax.config.jax_threefry_partitionable
            and not jax.config.jax_high_dynamic_range_gumbel)


def fold_in_rows(keys: Array, data: Array) -> Array:
    """jax.random.fold_in of raw threefry keys [..., 2] with uint32-able data [...]."""
    y1, y2 = threefry2x32(keys[..., 0], keys[..., 1], jnp.zeros_like(data, jnp.uint32),
                          data.astype(jnp.uint32))
    # Materialise the [..., 2] keys: fused into a [..., V] consumer, XLA would redo the 20 rounds
    # for every vocabulary entry.
    return jax.lax.optimization_barrier(jnp.stack([y1, y2], axis=-1))


def gumbel_noise(keys: Array, vocab: int) -> Array:
    """The Gumbel noise [..., vocab] that `jax.random.categorical` adds to the logits of one
    draw with each raw threefry key [..., 2] (uniform(tiny, 1) from the "low" bits, then
    -log(-log(u)))."""
    lo = jax.lax.broadcasted_iota(jnp.uint32, (1,) * (keys.ndim - 1) + (vocab,), keys.ndim - 1)
    b1, b2 = threefry2x32(keys[..., :1], keys[..., 1:], jnp.zeros_like(lo), lo)
    bits = b1 ^ b2
    tiny = jnp.finfo(jnp.float32).tiny
    u = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                     jnp.float32) - jnp.float32(1.0)
    u = jnp.maximum(jnp.float32(tiny), u * (jnp.float32(1.0) - jnp.float32(tiny)) + jnp.float32(tiny))
    return -jnp.log(-jnp.log(u))


def categorical_rows(keys: Optional[Array], logits: Array, noise: Optional[Array] = None) -> Array:
    """One draw per row of logits [B, V] with raw threefry keys [B, 2]: equals
    vmap(jax.random.categorical)(keys, logits) (gumbel-max over uniform(tiny, 1) bits).
    `noise` is `gumbel_noise(keys, V)` computed beforehand (then `keys` is not read)."""
    if noise is None and not fast_threefry():
        return jax.vmap(lambda k, l: jax.random.categorical(jax.random.wrap_key_data(k), l))(
            keys, logits).astype(jnp.int32)
    if noise is None:
        noise = gumbel_noise(keys, logits.shape[-1])
    # The barrier keeps the hash and logs in their own elementwise (vectorised) fusion: fused
    # into argmax's variadic reduce they run one scalar element at a time (~5x slower on CPU).
    return _argmax_rows(jax.lax.optimization_barrier(logits + noise))


def _argmax_rows(x: Array) -> Array:
    """argmax over the last axis (first index of the max) as two plain reductions."""
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, idx, x.shape[-1]), axis=-1).astype(jnp.int32)


def key_width() -> int:
    """uint32 words in a raw PRNG key of the default implementation (2 for threefry)."""
    return int(jax.random.key_data(jax.random.key(0)).shape[-1])


def sample_keys(seed: Array, prompt_index: Array, sample_index: Array) -> Array:
    """Raw base keys [M, 2] for (seed, prompt index, sample index) triples."""
    if fast_threefry() and key_width() == 2:  # PRNGKey(seed) of a uint32 seed is [0, seed]
        base = jnp.stack([jnp.zeros_like(prompt_index, jnp.uint32),
                          jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), prompt_index.shape)], -1)
        return fold_in_rows(fold_in_rows(base, prompt_index), sample_index)

    def one(p, s):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), p), s)
        return jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k
    return jax.vmap(one)(prompt_index, sample_index).astype(jnp.uint32)


def step_keys(keys: Array, generated: Array) -> Array:
    """Raw keys [..., 2] of the token each sample draws after `generated` tokens:
    fold_in(base key, generated)."""
    if fast_threefry():
        return fold_in_rows(keys, generated)
    fold = jax.vmap(lambda k, t: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), t)))
    return fold(keys.reshape(-1, keys.shape[-1]), generated.reshape(-1)).reshape(keys.shape)
