"""KV-cache generation engine for rollouts: jitted bucketed prefill, on-device decode chunks,
continuous batching over a fixed number of decode slots.

Layout. Every decode slot owns one row of a preallocated cache per layer (GQA: only the kv
heads are stored), heads-major and position-minor so that decode attention reads it in place:
keys and values [slots, kv_heads, head_dim, S] (`DecodeCache`), sharded by the logical rules
(`cache_batch` over data×fsdp, `kv_heads` over tensor). A prompt of length
L sits left-aligned at cache slots 0..L-1, so a token's cache slot equals its RoPE position
and no padding is ever attended.

Admission. Prefill computes the cache of `prompt[:-1]` (length bucketed to a static size) and
scatters it into every slot that runs a sample of that prompt: G samples share one prefill.
The last prompt token is fed by the first decode step, so the first generated token is sampled
by the same code (and the same per-sample key schedule) as every other token.

Decode. `decode_chunk` runs up to `chunk` steps in a `lax.while_loop` on device (leaving early
when every slot is idle); between chunks the host reads the emitted tokens, frees finished
slots and admits waiting requests (continuous batching).

Randomness. The key of the token generated at step t of sample s of prompt p is
fold_in(fold_in(fold_in(PRNGKey(seed), p), s), t): samples do not depend on slot assignment.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flowrl_jax.config import ModelArch, RolloutConfig
from flowrl_jax.mesh import batch_sharding, named_sharding, state_shardings
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM, apply_rope, matmul_params, rope_cos_sin
from flowrl_jax.errors import SamplingError  # noqa: F401 (re-exported)

# Decode layout of the cache, read in place by decode attention (a [B, S, K, D] cache gets
# transposed by XLA at every step and layer): keys and values [slots, kv_heads, head_dim, S]
# (see `DecodeCache`).
CACHE_AXES = ("cache_batch", "kv_heads", "head_dim", "cache_length")

Array = jax.Array

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: greedy when temperature == 0; top_k == 0 / top_p == 1 / min_p == 0 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise SamplingError naming the first impossible field."""
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p", "must be in [0, 1)"),
            (self.max_new_tokens > 0, "max_new_tokens", "must be > 0"),
            (self.n > 0, "n", "must be > 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise SamplingError(f"SamplingParams.{name}={getattr(self, name)!r}: {msg}")

    @classmethod
    def from_rollout_config(cls, cfg: RolloutConfig, seed: int = 0) -> "SamplingParams":
        """Sampling parameters of an RL rollout step (`cfg.rollout`); pass a per-step seed."""
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                   max_new_tokens=cfg.max_new_tokens, n=cfg.samples_per_prompt, seed=seed,
                   ignore_eos=cfg.ignore_eos, stop_token_ids=tuple(cfg.stop_token_ids))


@dataclass(frozen=True)
class _Spec:
    """The static (compile-time) part of sampling: one compiled decode per distinct spec."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float


@dataclass
class Rollout:
    """Generated samples, prompt-major (all n samples of prompt 0 first); numpy arrays."""

    prompt_index: np.ndarray  # [N] int32
    sample_index: np.ndarray  # [N] int32
    tokens: np.ndarray  # [N, max_new_tokens] int32, right-padded with 0
    logprobs: np.ndarray  # [N, max_new_tokens] float32, log_softmax(logits / T) of the sampled token
    lengths: np.ndarray  # [N] int32, generated tokens (including a final stop token)
    finish_reasons: list[str]  # "stop" | "length"

    def token_lists(self) -> list[list[int]]:
        """Generated tokens of each sample without padding."""
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]

    def logprob_lists(self) -> list[list[float]]:
        """Per-token log-probs of each sample without padding."""
        return [self.logprobs[i, :n].tolist() for i, n in enumerate(self.lengths)]


# --------------------------------------------------------------------------- sampling kernel


def sample_logits(logits: Array, keys: Optional[Array], spec: _Spec,
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


# ---- threefry, unrolled
# jax lowers threefry2x32 on CPU as a rolled while loop (5 iterations, each a few kernels);
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


def _fast_threefry() -> bool:
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
    if noise is None and not _fast_threefry():
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
    if _fast_threefry() and key_width() == 2:  # PRNGKey(seed) of a uint32 seed is [0, seed]
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
    if _fast_threefry():
        return fold_in_rows(keys, generated)
    fold = jax.vmap(lambda k, t: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), t)))
    return fold(keys.reshape(-1, keys.shape[-1]), generated.reshape(-1)).reshape(keys.shape)


#: a decode chunk draws the Gumbel noise of all its steps at once, before the loop, when that
#: takes at most this many bytes (chunk × slots × vocabulary × 4): a small vocabulary's hash
#: runs ~3× faster in one big fusion than per step (tiny model, 16 slots × 64 steps: generate
#: 9.8 → 8.7 ms). At a real vocabulary (152k) it would be gigabytes, and the per-step hash is
#: then a small part of a step (the LM head alone reads hidden × vocab weights).
DECODE_NOISE_MAX_BYTES = 8 << 20


def chunk_noise(st: "DecodeState", spec: _Spec, chunk: int, vocab: int) -> Optional[Array]:
    """[chunk, slots, vocab] Gumbel noise of every step of a decode chunk, or None (greedy,
    over DECODE_NOISE_MAX_BYTES, or a non-default PRNG). Step i of a slot that is active then
    has generated st.generated + i tokens (slots are admitted only between chunks), so its
    noise is the one the step would draw itself; rows of idle slots are never read."""
    slots = st.token.shape[0]
    if (spec.temperature == 0.0 or not _fast_threefry()
            or chunk * slots * vocab * 4 > DECODE_NOISE_MAX_BYTES):
        return None
    steps = jnp.arange(chunk, dtype=jnp.int32)[:, None]
    keys = step_keys(jnp.broadcast_to(st.keys, (chunk,) + st.keys.shape), st.generated[None] + steps)
    # the barrier keeps the hash out of the loop (XLA would otherwise sink it into each step)
    return jax.lax.optimization_barrier(gumbel_noise(keys, vocab))


# --------------------------------------------------------------------------- decode forward


class DecodeCache(NamedTuple):
    """One layer's decode cache: keys k and values v, both [slots, kv_heads, head_dim, S].

    Positions are the minor axis, so on CPU the score sum over head_dim adds whole rows of S
    (vectorised) instead of reducing 16-wide rows (~9% faster tiny decode steps), and the
    weighted sum of values reduces contiguous rows (with `decode_attention`'s late division:
    CPU attention 50 → 35 µs per layer at 32 slots × 96 positions, vs values [S, head_dim])."""

    k: Array
    v: Array

    @property
    def length(self) -> int:
        return self.v.shape[3]

    def window(self, w: int) -> "DecodeCache":
        """The first w slots (a copy)."""
        return DecodeCache(self.k[..., :w], self.v[..., :w])

    def put_window(self, part: "DecodeCache") -> "DecodeCache":
        """This cache with its first slots replaced by `part` (in place when donated)."""
        return DecodeCache(jax.lax.dynamic_update_slice(self.k, part.k, (0, 0, 0, 0)),
                           jax.lax.dynamic_update_slice(self.v, part.v, (0, 0, 0, 0)))


def _write_cols(cache: Array, new: Array, pos: Array) -> Array:
    """Write new [B, K, D] into a cache [B, K, D, S] at slot pos [B] (in place when donated)."""
    def one(c, n, i):
        return jax.lax.dynamic_update_slice(c, n[:, :, None].astype(c.dtype), (0, 0, i))
    return jax.vmap(one)(cache, new, pos)


#: decode attention form (`decode_attention`); None = by platform. Read when a decode program
#: is traced (tests set it to run the accelerator form on CPU).
DECODE_PRODUCTS: Optional[str] = None


def decode_attention(q: Array, k: Array, v: Array, visible: Array, products: str) -> Array:
    """One query token's attention over the decode cache: q [B, K, G, D] (G query heads per
    KV head), keys k and values v [B, K, D, S], visible [B, 1, 1, S] → [B, K, G, D] float32.

    products="elementwise" (CPU): q·k as D multiply-adds of whole key rows [S], one
    elementwise fusion (as a broadcast-multiply + reduce XLA materialises the [B, K, G, D, S]
    product first; as batched matmuls each costs ~0.1 ms per layer and step at 32 slots);
    the values are weighted by unnormalised exp(scores - max) and the [B, K, G, D] result is
    divided by the sum, not the [B, K, G, S] weights.
    products="matmul" (GPU/TPU): batched matmuls over (B, K) in the cache's dtype with float32
    accumulation, which read each KV head's cache once for its G query heads; the elementwise
    form re-reads it per query head, G× the HBM traffic of the dominant term at long lengths.
    """
    d = q.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    if products == "elementwise":
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        sc = qf[..., 0, None] * kf[:, :, None, 0]
        for j in range(1, d):
            sc = sc + qf[..., j, None] * kf[:, :, None, j]
    elif products == "matmul":
        sc = jnp.einsum("bkgd,bkds->bkgs", q.astype(k.dtype), k,
                        preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"decode_attention: unknown products {products!r}")
    sc = jnp.where(visible, sc * d ** -0.5, neg)  # [B, K, G, S]
    if products == "elementwise":
        e = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
        weighted = jnp.sum(e[:, :, :, None, :] * v[:, :, None].astype(jnp.float32), axis=-1)
        return weighted / jnp.sum(e, axis=-1)[..., None]
    p = jax.nn.softmax(sc, axis=-1)
    return jnp.einsum("bkgs,bkds->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def rope_table(arch: ModelArch, length: int) -> tuple[Array, Array]:
    """cos/sin [length, head_dim] of positions 0..length-1, built once per decode chunk: a
    step gathers its rows instead of evaluating cos/sin, which XLA would otherwise recompute
    inside each of the step's q and k RoPE fusions (4 per layer pair on the tiny model)."""
    cos, sin = rope_cos_sin(jnp.arange(length, dtype=jnp.int32)[None], arch.resolved_head_dim,
                            arch.rope_theta)
    return cos[0], sin[0]


#: CPU decode chunks multiply by [in, out] copies of the weights when all matmul weights
#: together take at most this many bytes (in compute dtype): a transient copy per chunk
#: (Qwen2.5-0.5B in float32: 2 GB), never on GPU/TPU...
DECODE_TRANSPOSE_MAX_BYTES = 4 << 30
#: ...and only for chunks of at least this many slots: a one-row step is a matrix-vector product,
#: as fast in either layout, so the copy is pure cost (0.5B, 64 tokens: batch 1 4.4 → 5.3 s
#: with it, batch 4 10.5 → 7.8 s, batch 32 23.7 → 21.0 s)...
DECODE_TRANSPOSE_MIN_SLOTS = 4
#: ...and steps: the 0.5B copy costs ≈ 0.9 s, the steps gain ≈ 55 ms each at batch 32
DECODE_TRANSPOSE_MIN_STEPS = 16


class DecodeMatrices(NamedTuple):
    """[in, out] copies of the matmul weights (compute dtype) for CPU decode steps, made once
    per decode chunk: XLA:CPU multiplies decode-shape rows by them 13-29% faster than by the
    [out, in] (Hugging Face) layout the model keeps, whose transpose it folds into each dot."""

    layers: list[tuple[Array, ...]]  # per layer: q, k, v, o, gate, up, down
    head: Array  # [hidden, vocab]


def _linears(model: Qwen2ForCausalLM) -> list[tuple[Any, ...]]:
    """Per layer, its Linear modules in `DecodeMatrices` order."""
    return [(lyr.self_attn.q_proj, lyr.self_attn.k_proj, lyr.self_attn.v_proj,
             lyr.self_attn.o_proj, lyr.mlp.gate_proj, lyr.mlp.up_proj, lyr.mlp.down_proj)
            for lyr in model.layers]


def matmul_weight_bytes(model: Qwen2ForCausalLM) -> int:
    """Bytes of every matmul weight (linear layers + LM head) in the compute dtype: what a
    decode step reads."""
    return matmul_params(model.arch) * jnp.dtype(model.num.compute_dtype).itemsize


def decode_matrices(model: Qwen2ForCausalLM, slots: int, steps: int) -> Optional[DecodeMatrices]:
    """The transposed weights for a chunk of `slots` rows and up to `steps` steps on CPU
    within the limits above, else None (the model's own layout)."""
    if (jax.default_backend() != "cpu" or slots < DECODE_TRANSPOSE_MIN_SLOTS
            or steps < DECODE_TRANSPOSE_MIN_STEPS):
        return None
    if matmul_weight_bytes(model) > DECODE_TRANSPOSE_MAX_BYTES:
        return None
    cd = model.num.compute_dtype
    mats = DecodeMatrices([tuple(m.weight[...].astype(cd).T for m in ms) for ms in _linears(model)],
                          model.lm_head_matrix())
    # the barrier makes the copies real: otherwise XLA folds each transpose back into its dot
    return jax.lax.optimization_barrier(mats)


def decode_forward(model: Qwen2ForCausalLM, token: Array, pos: Array,
                   cache: list[DecodeCache], rope: tuple[Array, Array],
                   mats: Optional[DecodeMatrices]) -> tuple[Array, list[DecodeCache]]:
    """One decode step: logits [B, V] of `token` [B] at position/cache slot `pos` [B].

    The same computation as the model's cached forward on the decode-layout cache, specialised
    to one query token (`decode_attention`: elementwise products on CPU, matmuls elsewhere).
    `rope` is a `rope_table` covering every position in `pos`; `mats` are `decode_matrices`
    (None: the model's weights as they are).
    Sampler only; the model's own forward stays the reference.
    """
    arch, num = model.arch, model.num
    b, s = token.shape[0], cache[0].length
    cos, sin = (jnp.take(t, pos, axis=0)[:, None] for t in rope)
    x = jnp.take(model.embed_tokens[...], token[:, None], axis=0).astype(num.compute_dtype)
    visible = (jnp.arange(s)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]
    products = DECODE_PRODUCTS or ("elementwise" if jax.default_backend() == "cpu" else "matmul")
    new_cache = []
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        at = layer.self_attn
        wq, wk, wv, wo, wg, wu, wd = (None,) * 7 if mats is None else mats.layers[i]
        n, kh, d = at.n_heads, at.n_kv, at.head_dim
        h = layer.input_layernorm(x)
        q = apply_rope(at.q_proj(h, wq).reshape(b, 1, n, d), cos, sin)
        k = apply_rope(at.k_proj(h, wk).reshape(b, 1, kh, d), cos, sin)
        v = at.v_proj(h, wv).reshape(b, 1, kh, d)
        k_all = _write_cols(c.k, k[:, 0], pos)
        v_all = _write_cols(c.v, v[:, 0], pos)
        out = decode_attention(q.reshape(b, kh, n // kh, d), k_all, v_all, visible, products)
        x = x + at.o_proj(out.astype(q.dtype).reshape(b, 1, n * d), wo)
        x = x + layer.mlp(layer.post_attention_layernorm(x), (wg, wu, wd))
        new_cache.append(DecodeCache(k_all, v_all))
    hidden = model.norm(x)
    if mats is None:
        return model.logits(hidden)[:, 0], new_cache
    return jnp.dot(hidden.astype(model.num.compute_dtype), mats.head)[:, 0], new_cache


# --------------------------------------------------------------------------- decode state


class DecodeState(NamedTuple):
    """Everything the decode loop carries, per slot; `pos` is both cache slot and RoPE position."""

    cache: list[DecodeCache]  # per layer, S slots
    token: Array  # [slots] int32 token fed at the next step
    pos: Array  # [slots] int32 its cache slot / position
    active: Array  # [slots] bool
    generated: Array  # [slots] int32 tokens generated so far
    budget: Array  # [slots] int32 max new tokens
    keys: Array  # [slots, key_width()] uint32 per-sample base key


class ChunkOut(NamedTuple):
    """Per-step outputs of a decode chunk, [chunk, slots] each."""

    tokens: Array
    logprobs: Array
    emitted: Array  # bool: the slot produced a token at this step
    finish: Array  # int32: FINISH_* for the step that ended the sample


def cache_bytes(arch: ModelArch, slots: int, length: int, dtype: Any) -> int:
    """KV-cache bytes: slots × length × layers × 2 × kv_heads × head_dim × itemsize."""
    return (slots * length * arch.num_hidden_layers * 2 * arch.num_key_value_heads
            * arch.resolved_head_dim * jnp.dtype(dtype).itemsize)


def _device_free_bytes(device: jax.Device) -> Optional[int]:
    """Free memory of a device when the backend reports it (GPU/TPU), else None (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of the largest."""
    for b in sorted(buckets):
        if b >= n:
            return b
    top = max(buckets)
    return int(math.ceil(n / top) * top)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


# --------------------------------------------------------------------------- engine


class Kernels:
    """The jitted device functions for one (model graph, mesh, cache dtype).

    Cached per key, so every engine over the same architecture shares compilations (the
    trainer's engine, eval engines, tests). Only array shapes and `_Spec` trigger recompiles.
    """

    def __init__(self, graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any):
        self.graphdef, self.arch, self.mesh = graphdef, arch, mesh
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.admit = jax.jit(self._admit, donate_argnums=(1,))
        self.prefill = jax.jit(self._prefill)
        self.insert = jax.jit(self._insert, donate_argnums=(0,))
        self.chunk = jax.jit(self._decode_chunk, static_argnums=(3, 4), donate_argnums=(1,))
        self._init_fns: dict[tuple[int, int], Any] = {}

    # ----------------------------------------------------------------- shardings

    def state_shardings(self, slots: int, length: int) -> Optional[DecodeState]:
        """NamedShardings of a decode state (None without a mesh)."""
        if self.mesh is None:
            return None
        cs = named_sharding(self.mesh, CACHE_AXES, self.cache_shape(slots, length))
        b1 = batch_sharding(self.mesh, 1, (slots,))
        b2 = batch_sharding(self.mesh, 2, (slots, key_width()))
        return DecodeState([DecodeCache(cs, cs) for _ in range(self.arch.num_hidden_layers)],
                           b1, b1, b1, b1, b1, b2)

    def cache_shape(self, slots: int, length: int) -> tuple[int, int, int, int]:
        """Keys and values: [slots, kv_heads, head_dim, length]."""
        return (slots, self.arch.num_key_value_heads, self.arch.resolved_head_dim, length)

    def constrain(self, st: DecodeState) -> DecodeState:
        sh = self.state_shardings(st.token.shape[0], st.cache[0].length)
        return st if sh is None else jax.lax.with_sharding_constraint(st, sh)

    def init_state(self, slots: int, length: int) -> DecodeState:
        """An empty decode state (all slots idle) placed in its shardings."""
        key = (slots, length)
        if key not in self._init_fns:  # one compiled initialiser per shape, not one per call
            shape = self.cache_shape(slots, length)

            def make():
                cache = [DecodeCache(jnp.zeros(shape, self.cache_dtype),
                                     jnp.zeros(shape, self.cache_dtype))
                         for _ in range(self.arch.num_hidden_layers)]
                zi = jnp.zeros((slots,), jnp.int32)
                return DecodeState(cache, zi, zi, jnp.zeros((slots,), bool), zi, zi,
                                   jnp.zeros((slots, key_width()), jnp.uint32))

            self._init_fns[key] = jax.jit(make, out_shardings=self.state_shardings(slots, length))
        return self._init_fns[key]()

    # ----------------------------------------------------------------- traced functions

    def _prefill(self, params: Any, tokens: Array, lengths: Array) -> list[DecodeCache]:
        """Decode-layout cache (P slots) of right-padded prompts `tokens` [B, P] with `lengths` [B]."""
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        # Prefill is the model's no-cache pass (cuDNN / flash attention where they apply, no
        # [P, P] scores at long prompts) keeping its [B, P, K, D] keys and values, transposed
        # once to the decode layout. Every row counts at least one token: a one-token prompt
        # (or an unused row) has an empty prefix, and the kernels want a real key per row; the
        # decode step overwrites that slot before any query can see it.
        valid = jnp.arange(p)[None, :] < jnp.maximum(lengths, 1)[:, None]
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
        out = model(tokens, valid, positions, return_logits=False, return_kv=True, remat=False)
        return [DecodeCache(c.k.astype(self.cache_dtype).transpose(0, 2, 3, 1),
                            c.v.astype(self.cache_dtype).transpose(0, 2, 3, 1))
                for c in out.cache]

    def _insert(self, st: DecodeState, prefix: list[DecodeCache], src: Array, dst: Array,
                last_token: Array, pos: Array, budget: Array, keys: Array) -> DecodeState:
        """Copy prefix rows `src` [M] into slots `dst` [M] (out-of-range dst = no-op)."""
        p = prefix[0].length
        cache = []
        for c, pc in zip(st.cache, prefix):
            k = c.k.at[dst, :, :, :p].set(pc.k[src].astype(c.k.dtype), mode="drop")
            v = c.v.at[dst, :, :, :p].set(pc.v[src].astype(c.v.dtype), mode="drop")
            cache.append(DecodeCache(k, v))

        def put(a, x):
            return a.at[dst].set(x.astype(a.dtype), mode="drop")

        st = DecodeState(cache, put(st.token, last_token), put(st.pos, pos),
                         put(st.active, jnp.ones_like(dst, bool)), put(st.generated, jnp.zeros_like(dst)),
                         put(st.budget, budget), put(st.keys, keys))
        return self.constrain(st)

    def _admit(self, params: Any, st: DecodeState, tokens: Array, lengths: Array, src: Array,
               dst: Array, last_token: Array, budget: Array, seed: Array, prompt_index: Array,
               sample_index: Array) -> DecodeState:
        """Prefill a batch of prompts once and insert each into its slots (G copies)."""
        prefix = self._prefill(params, tokens, lengths)
        keys = sample_keys(seed, prompt_index, sample_index)
        return self._insert(st, prefix, src, dst, last_token, lengths[src], budget, keys)

    def _step(self, model: Qwen2ForCausalLM, st: DecodeState, stop_ids: Array, spec: _Spec,
              length: int, rope: tuple[Array, Array], mats: Optional[DecodeMatrices],
              noise: Optional[Array] = None):
        """One decode step. `length` is the full cache length (`st` may carry a window of the
        cache, its first slots; every active slot's position is then inside the window).
        `noise`: this step's rows of `chunk_noise`, if the chunk made it."""
        pos = jnp.minimum(st.pos, length - 1)
        logits, new_cache = decode_forward(model, st.token, pos, st.cache, rope, mats)
        logits = logits.astype(jnp.float32)
        keys = None if noise is not None else step_keys(st.keys, st.generated)
        tok, logp = sample_logits(logits, keys, spec, noise)
        gen = st.generated + 1
        stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)  # stop_ids padded with -1
        at_length = (gen >= st.budget) | (pos + 1 >= length)
        act = st.active
        finish = jnp.where(act & stop, FINISH_STOP,
                           jnp.where(act & at_length, FINISH_LENGTH, FINISH_NONE))
        new = DecodeState(new_cache, jnp.where(act, tok, st.token), st.pos + act.astype(jnp.int32),
                          act & (finish == FINISH_NONE), jnp.where(act, gen, st.generated),
                          st.budget, st.keys)
        return self.constrain(new), (tok, logp, act, finish.astype(jnp.int32))

    def _decode_chunk(self, params: Any, st: DecodeState, stop_ids: Array, spec: _Spec,
                      chunk: int) -> tuple[DecodeState, ChunkOut]:
        """Up to `chunk` decode steps on device; stops early when every slot is idle.

        Attention reads only a window of the cache: the steps run in segments, one per
        static window size (`decode_windows`), each on the cache's first `w` slots while every
        active slot's position is below `w`. Slots past the window are never read before they
        are written, so this is exact; a segment costs one copy of its window in and out.
        """
        model = nnx.merge(self.graphdef, params)
        slots, length = st.token.shape[0], st.cache[0].length
        rope = rope_table(self.arch, length)
        mats = decode_matrices(model, slots, chunk)
        noise = chunk_noise(st, spec, chunk, self.arch.vocab_size)
        outs = ChunkOut(jnp.zeros((chunk, slots), jnp.int32), jnp.zeros((chunk, slots), jnp.float32),
                        jnp.zeros((chunk, slots), bool), jnp.zeros((chunk, slots), jnp.int32))

        def fits(s: DecodeState, window: int) -> Array:
            return jnp.max(jnp.where(s.active, s.pos, 0)) < window

        def segment(carry, window: int):
            def cond(c):
                i, s, _ = c
                ok = (i < chunk) & jnp.any(s.active)
                return ok & fits(s, window) if window < length else ok

            def body(c):
                i, s, outs = c
                s, row = self._step(model, s, stop_ids, spec, length, rope, mats,
                                    None if noise is None else noise[i])
                outs = ChunkOut(*[o.at[i].set(r) for o, r in zip(outs, row)])
                return i + 1, s, outs

            return jax.lax.while_loop(cond, body, carry)

        carry = (jnp.int32(0), st, outs)
        for w in decode_windows(length, chunk)[:-1]:
            def windowed(c, w=w):
                i, s, o = c
                part = s._replace(cache=[x.window(w) for x in s.cache])
                i, part, o = segment((i, part, o), w)
                full = [x.put_window(y) for x, y in zip(s.cache, part.cache)]
                return i, self.constrain(part._replace(cache=full)), o

            i, s, _ = carry
            run = (i < chunk) & jnp.any(s.active) & fits(s, w)
            carry = jax.lax.cond(run, windowed, lambda c: c, carry)
        _, st, outs = segment(carry, length)
        return st, outs


def decode_windows(length: int, chunk: int) -> tuple[int, ...]:
    """Static attention windows of a decode chunk over a cache of `length` slots: up to
    DECODE_WINDOWS sizes, multiples of 16, ending with `length` (only `length` for short
    chunks or caches, where a segment's copies and compile time would not pay off)."""
    if chunk < 8 or length < max(64, DECODE_WINDOWS_MIN_LENGTH):
        return (length,)
    step = max(16, -(-length // DECODE_WINDOWS // 16) * 16)
    return tuple(range(step, length, step)) + (length,)


#: most attention windows per decode chunk (each compiles one more decode loop)
DECODE_WINDOWS = 4

#: caches shorter than this decode in one window: the attention reads that windows save are a
#: small part of such a step, while each window compiles one more decode loop (Qwen2.5-0.5B,
#: 192 slots, CPU: lowering + compiling 4 windows 27 s, one 5.4 s; tiny model at 96 slots:
#: the same step time either way)
DECODE_WINDOWS_MIN_LENGTH = 512


_KERNELS: dict[tuple, Kernels] = {}


def kernels_for(graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any) -> Kernels:
    """The shared `Kernels` of a model graph on a mesh."""
    key = (graphdef, arch, mesh, jnp.dtype(cache_dtype).name)
    if key not in _KERNELS:
        _KERNELS[key] = Kernels(graphdef, arch, mesh, cache_dtype)
    return _KERNELS[key]


#: On CPU, models whose matmul weights fit this many bytes decode in parallel groups, one per
#: core (`SamplingEngine.decode_groups`): XLA:CPU runs such a model's small dots on one core, so
#: a second loop over half the slots doubles the cores in use. Above it the dots already use
#: every core and each group re-reads weights that no longer fit the cache (2 groups vs one
#: loop, 32 samples × 64 tokens, 2-core VM with a 32 MiB L3: 0.3 MiB of weights 1.3-1.6×,
#: 2.4 MiB 1.66×, 19 MiB 1.16×, 74 MiB 0.87×, Qwen2.5-0.5B 0.8×).
DECODE_GROUPS_MAX_WEIGHT_BYTES = 32 << 20
#: ...each group keeps at least this many slots (fewer rows per step waste a group's loop;
#: tiny model, 8 samples in 2 groups of 4: 5.8 → 4.7 ms, 4 samples in 2 groups of 2: 4.0 → 6.1)...
DECODE_GROUP_MIN_SLOTS = 4
#: ...and calls run at least this many new tokens (a thread start is ~0.1 ms)
DECODE_GROUP_MIN_STEPS = 16


def host_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_GROUP_POOL: Optional[ThreadPoolExecutor] = None
_GROUP_POOL_LOCK = threading.Lock()


def _group_pool() -> ThreadPoolExecutor:
    """The process's threads for decode groups beyond the caller's, one per core at most
    (kept: a thread's first XLA calls are slower than its later ones; threads start on
    demand). More groups than threads only queue: correct, if slower."""
    global _GROUP_POOL
    with _GROUP_POOL_LOCK:
        if _GROUP_POOL is None:
            _GROUP_POOL = ThreadPoolExecutor(host_cores(), thread_name_prefix="flowrl-decode-group")
        return _GROUP_POOL


class _RolloutBuffers:
    """Host arrays a `generate` call fills row by row (row = prompt × n + sample)."""

    def __init__(self, rows: int, max_new_tokens: int):
        # a sample never exceeds max_new_tokens
        self.tokens = np.zeros((rows, max_new_tokens), np.int32)
        self.logprobs = np.zeros((rows, max_new_tokens), np.float32)
        self.lengths = np.zeros((rows,), np.int32)
        self.reasons = [""] * rows


MAX_STOP_IDS = 8  # stop ids travel as a padded array so that changing them never recompiles


class SamplingEngine:
    """Jitted prefill/insert/decode over a slot-based KV cache, driven by a host scheduler.

    Build once per model architecture; call `generate(params, prompts, sampling)` with the
    trainer's current parameters (an nnx.State or a model) each rollout step.
    """

    def __init__(self, model: Qwen2ForCausalLM, *, mesh: Optional[Mesh] = None,
                 decode_slots: int = 256, decode_chunk: int = 64,
                 prefill_buckets: Sequence[int] = (128, 256, 512, 1024, 2048),
                 prefill_batch: int = 8, eos_token_ids: Optional[Sequence[int]] = None,
                 pad_token_id: int = 0, cache_dtype: Any = None, verbose: bool = True):
        self.graphdef = nnx.graphdef(model)
        self.arch: ModelArch = model.arch
        self.weight_bytes = matmul_weight_bytes(model)
        self.cache_dtype = jnp.dtype(cache_dtype or model.num.compute_dtype)
        self.mesh = mesh
        self.decode_slots = int(decode_slots)
        self.decode_chunk = int(decode_chunk)
        self.prefill_buckets = tuple(sorted(int(b) for b in prefill_buckets))
        self.prefill_batch = int(prefill_batch)
        if eos_token_ids is None:
            eos_token_ids = () if self.arch.eos_token_id is None else (self.arch.eos_token_id,)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.verbose = verbose
        self._printed: set = set()
        if (self.decode_slots <= 0 or self.decode_chunk <= 0 or self.prefill_batch <= 0
                or not self.prefill_buckets):
            raise SamplingError("decode_slots, decode_chunk, prefill_batch must be > 0 and "
                                "prefill_buckets non-empty")
        self.kernels = kernels_for(self.graphdef, self.arch, mesh, self.cache_dtype)

    @classmethod
    def from_rollout_config(cls, model: Qwen2ForCausalLM, cfg: RolloutConfig,
                            mesh: Optional[Mesh] = None, **kw: Any) -> "SamplingEngine":
        """An engine sized by `cfg.rollout` (decode_slots, decode_chunk, prefill_buckets)."""
        return cls(model, mesh=mesh, decode_slots=cfg.decode_slots, decode_chunk=cfg.decode_chunk,
                   prefill_buckets=cfg.prefill_buckets, **kw)

    # ----------------------------------------------------------------- params / memory

    def params_of(self, params: Any) -> Any:
        """The nnx.State to run with: the given arrays as they are, resharded only when they
        live on a different mesh than the engine's."""
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        if self.mesh is None:
            return params
        leaves = jax.tree.leaves(params)
        same = all(isinstance(getattr(x, "sharding", None), NamedSharding)
                   and x.sharding.mesh == self.mesh for x in leaves)
        if same:
            return params
        abstract = nnx.state(nnx.merge(self.graphdef, params))
        return jax.device_put(params, state_shardings(abstract, self.mesh))

    def init_state(self, slots: int, length: int) -> DecodeState:
        """An empty decode state (all slots idle) placed in its shardings."""
        return self.kernels.init_state(slots, length)

    def check_fits(self, prompt_lengths: Sequence[int], max_new_tokens: int, slots: int,
                   length: int) -> int:
        """Validate lengths and memory before any compute; print and return the cache bytes."""
        limit = self.arch.max_position_embeddings
        for i, n in enumerate(prompt_lengths):
            if n <= 0:
                raise SamplingError(f"prompt {i} is empty: every prompt needs at least one token")
            if n + max_new_tokens > limit:
                raise SamplingError(
                    f"prompt {i}: {n} prompt tokens + max_new_tokens {max_new_tokens} = "
                    f"{n + max_new_tokens} exceeds the model's max_position_embeddings {limit}")
            if n - 1 + max_new_tokens > length:  # the last generated token is never cached
                raise SamplingError(f"prompt {i}: {n} + {max_new_tokens} tokens exceed the KV cache "
                                    f"length {length}")
        nbytes = cache_bytes(self.arch, slots, length, self.cache_dtype)
        shards = 1
        if self.mesh is not None:
            spec = named_sharding(self.mesh, CACHE_AXES,
                                  self.kernels.cache_shape(slots, length)).spec
            for axes in spec:
                for a in ((axes,) if isinstance(axes, str) else (axes or ())):
                    shards *= self.mesh.shape[a]
        dev = self.device
        free = _device_free_bytes(dev)
        if free is not None and nbytes / shards > free:
            raise SamplingError(
                f"KV cache needs {nbytes / shards / 2**30:.2f} GiB per device ({slots} slots × "
                f"{length} tokens) but only {free / 2**30:.2f} GiB is free on {dev}; lower "
                "rollout.decode_slots or max_new_tokens")
        key = (slots, length)
        if self.verbose and key not in self._printed:
            self._printed.add(key)
            print(f"[sampler] KV cache: {slots} slots × {length} tokens × "
                  f"{self.arch.num_hidden_layers} layers × 2 × {self.arch.num_key_value_heads} kv "
                  f"heads × {self.arch.resolved_head_dim} × {self.cache_dtype.itemsize} B = "
                  f"{nbytes / 2**20:.1f} MiB", file=sys.stderr)
        return nbytes

    # ----------------------------------------------------------------- host API

    def spec_for(self, sampling: SamplingParams) -> _Spec:
        """The static (compiled) part of `sampling`."""
        return _Spec(float(sampling.temperature), float(sampling.top_p), int(sampling.top_k),
                     float(sampling.min_p))

    def stop_ids_for(self, sampling: SamplingParams) -> np.ndarray:
        """Stop ids (EOS unless ignore_eos, plus stop_token_ids) padded with -1."""
        stops = set(int(t) for t in sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops |= set(self.eos_token_ids)
        width = max(MAX_STOP_IDS, _pow2(len(stops)))
        out = np.full((width,), -1, np.int32)
        out[:len(stops)] = sorted(stops)
        return out

    def cache_length(self, max_prompt_len: int, max_new_tokens: int) -> int:
        """Cache length: prompt bucket + max_new_tokens rounded up to 32 (fewer shapes)."""
        return (_bucket(max(1, max_prompt_len - 1), self.prefill_buckets)
                + int(math.ceil(max_new_tokens / 32) * 32))

    def num_slots(self, n_requests: int) -> int:
        """Slots for a call: enough for every request up to decode_slots, a power of two,
        divisible by the batch shards of the mesh."""
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        slots = min(self.decode_slots, max(_pow2(n_requests), shards))
        return int(math.ceil(slots / shards) * shards)

    @property
    def device(self) -> jax.Device:
        """The engine's (first) device."""
        return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

    def decode_groups(self, slots: int, max_new_tokens: int) -> int:
        """How many parallel decode groups a call with `slots` slots runs (1 = one decode
        loop). On a multi-core CPU host with no multi-device mesh, a model whose matmul weights
        fit DECODE_GROUPS_MAX_WEIGHT_BYTES splits its slots over up to one group per core, each
        with at least DECODE_GROUP_MIN_SLOTS slots, run in threads (`generate`)."""
        if self.mesh is not None and self.mesh.devices.size > 1:
            return 1
        if (self.device.platform != "cpu" or max_new_tokens < DECODE_GROUP_MIN_STEPS
                or self.weight_bytes > DECODE_GROUPS_MAX_WEIGHT_BYTES):
            return 1
        return max(1, min(host_cores(), slots // DECODE_GROUP_MIN_SLOTS))

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> Rollout:
        """Sample `sampling.n` responses for each prompt (token-id lists) with `params`."""
        sampling.validate()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise SamplingError("no prompts given")
        vocab = self.arch.vocab_size
        for i, p in enumerate(prompts):
            if p and (min(p) < 0 or max(p) >= vocab):
                raise SamplingError(f"prompt {i}: token id {max(p) if max(p) >= vocab else min(p)} "
                                    f"is outside the vocabulary [0, {vocab})")
        n_total = len(prompts) * sampling.n
        slots = self.num_slots(n_total)
        length = self.cache_length(max(len(p) for p in prompts), sampling.max_new_tokens)
        self.check_fits([len(p) for p in prompts], sampling.max_new_tokens, slots, length)
        params = self.params_of(params)
        # Work items in prompt-major order; a prompt's samples may be split over admissions
        # (and over decode groups).
        queue = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        out = _RolloutBuffers(n_total, sampling.max_new_tokens)
        groups = min(self.decode_groups(slots, sampling.max_new_tokens), n_total)
        if groups == 1:
            self._decode_items(params, prompts, queue, sampling, slots, length, out)
        else:
            # Contiguous runs of the queue keep most of a prompt's samples in one group (one
            # prefill); each group has its share of the slots, so the caches take the same
            # memory as one loop's. Rows are disjoint, so the groups write `out` concurrently.
            bounds = np.linspace(0, n_total, groups + 1).round().astype(int)
            parts = [queue[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            g_slots = slots // groups
            pool = _group_pool()
            futures = [pool.submit(self._decode_items, params, prompts, part, sampling,
                                   g_slots, length, out) for part in parts[1:]]
            try:
                self._decode_items(params, prompts, parts[0], sampling, g_slots, length, out)
            finally:
                errors = [f.exception() for f in futures]  # waits for every group
            for e in errors:
                if e is not None:
                    raise e
        n_prompts = len(prompts)
        return Rollout(np.repeat(np.arange(n_prompts, dtype=np.int32), sampling.n),
                       np.tile(np.arange(sampling.n, dtype=np.int32), n_prompts),
                       out.tokens, out.logprobs, out.lengths, out.reasons)

    def _decode_items(self, params: Any, prompts: list[list[int]], queue: list[tuple[int, int]],
                      sampling: SamplingParams, slots: int, length: int,
                      out: "_RolloutBuffers") -> None:
        """Run the work items `queue` ((prompt, sample) pairs) to completion on one decode
        state of `slots` slots (continuous batching), writing each into row
        prompt × n + sample of `out`."""
        spec = self.spec_for(sampling)
        stop_ids = self.stop_ids_for(sampling)
        st = self.init_state(slots, length)
        qi = 0
        owner = [-1] * slots  # slot → row in the output
        free = list(range(slots))
        done = 0
        while done < len(queue):
            while free and qi < len(queue):
                take, used = self._next_admission(queue, qi, len(free), prompts)
                qi += len(take)
                st = self._admit_batch(params, st, prompts, take, free[:len(take)], sampling)
                for item, slot in zip(take, free[:len(take)]):
                    owner[slot] = item[0] * sampling.n + item[1]
                free = free[len(take):]
            st, outs = self.kernels.chunk(params, st, stop_ids, spec, self.decode_chunk)
            o_tok, o_lp, o_em, o_fin = (np.asarray(x) for x in jax.device_get(tuple(outs)))
            for slot in np.nonzero(o_em.any(axis=0))[0].tolist():
                row = owner[slot]
                m = o_em[:, slot]
                n0, n1 = int(out.lengths[row]), int(out.lengths[row]) + int(m.sum())
                out.tokens[row, n0:n1] = o_tok[m, slot]
                out.logprobs[row, n0:n1] = o_lp[m, slot]
                out.lengths[row] = n1
                fin = int(o_fin[m, slot][-1])
                if fin != FINISH_NONE:
                    out.reasons[row] = FINISH_NAMES[fin]
                    owner[slot] = -1
                    free.append(slot)
                    done += 1
            free.sort()

    def _next_admission(self, queue: list[tuple[int, int]], qi: int, n_free: int,
                        prompts: list[list[int]]) -> tuple[list[tuple[int, int]], int]:
        """The next work items to admit: at most n_free samples of at most prefill_batch prompts."""
        take: list[tuple[int, int]] = []
        seen: set[int] = set()
        while qi < len(queue) and len(take) < n_free:
            p = queue[qi][0]
            if p not in seen and len(seen) == self.prefill_batch:
                break
            seen.add(p)
            take.append(queue[qi])
            qi += 1
        return take, len(seen)

    def _admit_batch(self, params: Any, st: DecodeState, prompts: list[list[int]],
                     take: list[tuple[int, int]], slots_for: list[int],
                     sampling: SamplingParams) -> DecodeState:
        """Prefill the distinct prompts of `take` once and insert each sample into its slot."""
        slots = st.token.shape[0]
        uniq = sorted({p for p, _ in take})
        row_of = {p: i for i, p in enumerate(uniq)}
        plen = max(len(prompts[p]) - 1 for p in uniq)
        pb = _bucket(max(plen, 1), self.prefill_buckets)
        bb = min(self.prefill_batch, _pow2(slots))  # one static prefill batch size
        tokens = np.full((bb, pb), self.pad_token_id, np.int32)
        lengths = np.zeros((bb,), np.int32)
        for p in uniq:
            body = prompts[p][:-1]
            tokens[row_of[p], :len(body)] = body
            lengths[row_of[p]] = len(body)
        src = np.zeros((slots,), np.int32)
        dst = np.full((slots,), slots, np.int32)  # out of range → dropped by the scatter
        last = np.zeros((slots,), np.int32)
        pidx = np.zeros((slots,), np.int32)
        sidx = np.zeros((slots,), np.int32)
        for j, ((p, s), slot) in enumerate(zip(take, slots_for)):
            src[j], dst[j], last[j], pidx[j], sidx[j] = row_of[p], slot, prompts[p][-1], p, s
        budget = np.full((slots,), sampling.max_new_tokens, np.int32)
        return self.kernels.admit(params, st, tokens, lengths, src, dst, last, budget,
                                  np.uint32(sampling.seed % 2**32), pidx, sidx)


def generate(engine: SamplingEngine, params: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams) -> Rollout:
    """Functional alias of `engine.generate`."""
    return engine.generate(params, prompts, sampling)
