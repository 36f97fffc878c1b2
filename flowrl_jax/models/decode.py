"""The model's decode path: its KV-cache layout, the prefill that fills it, and one decode
step (`decode_forward`) over it. The sampler (sampling/kernels.py) runs exactly these.

Layout. Every decode slot owns one row of a preallocated cache per layer (GQA: only the kv
heads are stored), heads-major and position-minor so that decode attention reads it in place
(a [B, S, K, D] cache gets transposed by XLA at every step and layer): keys and values
[slots, kv_heads, head_dim, S] (`DecodeCache`), sharded by the logical rules in `CACHE_AXES`
(`cache_batch` over data×fsdp, `kv_heads` over tensor). A prompt of length L sits
left-aligned at cache slots 0..L-1, so a token's cache slot equals its RoPE position and no
padding is ever attended.

The model's own forward (`Qwen2ForCausalLM.__call__`, no cache) stays the reference: the
prefill is that pass keeping its keys and values, and tests check token-by-token decoding
through `decode_forward` against it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from flowrl_jax.config import ModelArch
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM, apply_rope, rope_cos_sin

Array = jax.Array

#: logical axes of a decode cache's keys and values (see `DecodeCache`)
CACHE_AXES = ("cache_batch", "kv_heads", "head_dim", "cache_length")

#: forms of the decode attention's products (`decode_attention`)
PRODUCTS = ("elementwise", "matmul")


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
        """Positions (cache slots) per row."""
        return self.v.shape[3]


def cache_shape(arch: ModelArch, slots: int, length: int) -> tuple[int, int, int, int]:
    """Shape of one layer's keys (and values): [slots, kv_heads, head_dim, length]."""
    return (slots, arch.num_key_value_heads, arch.resolved_head_dim, length)


def cache_bytes(arch: ModelArch, slots: int, length: int, dtype: Any) -> int:
    """KV-cache bytes: slots × length × layers × 2 × kv_heads × head_dim × itemsize."""
    return (slots * length * arch.num_hidden_layers * 2 * arch.num_key_value_heads
            * arch.resolved_head_dim * jnp.dtype(dtype).itemsize)


def empty_cache(arch: ModelArch, slots: int, length: int, dtype: Any) -> list[DecodeCache]:
    """A zeroed decode cache, one `DecodeCache` per layer."""
    shape = cache_shape(arch, slots, length)
    return [DecodeCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(arch.num_hidden_layers)]


def prefill(model: Qwen2ForCausalLM, tokens: Array, lengths: Array,
            dtype: Any) -> list[DecodeCache]:
    """Decode-layout cache (P slots, `dtype`) of right-padded prompts `tokens` [B, P] with
    `lengths` [B].

    The model's no-cache pass (cuDNN / flash attention where they apply, no [P, P] scores at
    long prompts) keeping its [B, P, K, D] keys and values, transposed once to the decode
    layout. Every row counts at least one token: a one-token prompt (or an unused row) has an
    empty prefix, and the kernels want a real key per row; the decode step overwrites that
    slot before any query can see it.
    """
    b, p = tokens.shape
    valid = jnp.arange(p)[None, :] < jnp.maximum(lengths, 1)[:, None]
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
    out = model(tokens, valid, positions, return_logits=False, return_kv=True, remat=False)
    return [DecodeCache(c.k.astype(dtype).transpose(0, 2, 3, 1),
                        c.v.astype(dtype).transpose(0, 2, 3, 1))
            for c in out.kv]


def _write_cols(cache: Array, new: Array, pos: Array) -> Array:
    """Write new [B, K, D] into a cache [B, K, D, S] at slot pos [B] (in place when donated)."""
    def one(c, n, i):
        return jax.lax.dynamic_update_slice(c, n[:, :, None].astype(c.dtype), (0, 0, i))
    return jax.vmap(one)(cache, new, pos)


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
        raise ValueError(f"decode_attention: unknown products {products!r}; use one of {PRODUCTS}")
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


class DecodeMatrices(NamedTuple):
    """[in, out] copies of the matmul weights (compute dtype) that decode steps may multiply
    by instead of the model's [out, in] (Hugging Face) layout: XLA:CPU multiplies
    decode-shape rows by them 13-29% faster than by the layout whose transpose it folds into
    each dot (when the sampler makes them: sampling/cpu_fast_paths.py)."""

    layers: list[tuple[Array, ...]]  # per layer: q, k, v, o, gate, up, down
    head: Array  # [hidden, vocab]


def layer_linears(model: Qwen2ForCausalLM) -> list[tuple[Any, ...]]:
    """Per layer, its Linear modules in `DecodeMatrices` order."""
    return [(lyr.self_attn.q_proj, lyr.self_attn.k_proj, lyr.self_attn.v_proj,
             lyr.self_attn.o_proj, lyr.mlp.gate_proj, lyr.mlp.up_proj, lyr.mlp.down_proj)
            for lyr in model.layers]


def transposed_weights(model: Qwen2ForCausalLM) -> DecodeMatrices:
    """The model's matmul weights as [in, out] copies in compute dtype (traced: call inside
    the jit that uses them)."""
    cd = model.num.compute_dtype
    mats = DecodeMatrices([tuple(m.weight[...].astype(cd).T for m in ms)
                           for ms in layer_linears(model)], model.lm_head_matrix())
    # the barrier makes the copies real: otherwise XLA folds each transpose back into its dot
    return jax.lax.optimization_barrier(mats)


def decode_forward(model: Qwen2ForCausalLM, token: Array, pos: Array,
                   cache: list[DecodeCache], rope: tuple[Array, Array],
                   mats: Optional[DecodeMatrices], products: str) -> tuple[Array, list[DecodeCache]]:
    """One decode step: logits [B, V] of `token` [B] at position/cache slot `pos` [B], and the
    cache with this token's keys and values written at `pos`.

    The model's forward specialised to one query token over the decode-layout cache.
    `rope` is a `rope_table` covering every position in `pos`; `mats` are
    `transposed_weights` (None: the model's weights as they are); `products` picks the form
    of `decode_attention` ("elementwise" or "matmul").
    """
    visible = (jnp.arange(cache[0].length)[None, :] <= pos[:, None])[:, None, None, :]  # [B,1,1,S]

    def attend(i: int, q: Array, k: Array, v: Array) -> tuple[Array, DecodeCache]:
        c = DecodeCache(_write_cols(cache[i].k, k, pos), _write_cols(cache[i].v, v, pos))
        return decode_attention(q, c.k, c.v, visible, products), c

    return decode_layers(model, token, pos, rope, mats, attend)


#: attend(layer index, q [B, kv_heads, group, D], k and v [B, kv_heads, D] of this token)
#: → (attention output [B, kv_heads, group, D], the layer's updated cache)
Attend = Callable[[int, Array, Array, Array], tuple[Array, Any]]


def decode_layers(model: Qwen2ForCausalLM, token: Array, pos: Array, rope: tuple[Array, Array],
                  mats: Optional[DecodeMatrices], attend: Attend) -> tuple[Array, list[Any]]:
    """The decoder stack for one query token per row: logits [B, V] and each layer's updated
    cache, the cache's layout (dense rows or pages) left to `attend`."""
    b = token.shape[0]
    cos, sin = (jnp.take(t, pos, axis=0)[:, None] for t in rope)
    x = jnp.take(model.embed_tokens[...], token[:, None], axis=0).astype(model.num.compute_dtype)
    new_cache = []
    for i, layer in enumerate(model.layers):
        at = layer.self_attn
        wq, wk, wv, wo, wg, wu, wd = (None,) * 7 if mats is None else mats.layers[i]
        n, kh, d = at.n_heads, at.n_kv, at.head_dim
        h = layer.input_layernorm(x)
        q = apply_rope(at.q_proj(h, wq).reshape(b, 1, n, d), cos, sin)
        k = apply_rope(at.k_proj(h, wk).reshape(b, 1, kh, d), cos, sin)
        v = at.v_proj(h, wv).reshape(b, 1, kh, d)
        out, c = attend(i, q.reshape(b, kh, n // kh, d), k[:, 0], v[:, 0])
        x = x + at.o_proj(out.astype(q.dtype).reshape(b, 1, n * d), wo)
        x = x + layer.mlp(layer.post_attention_layernorm(x), (wg, wu, wd))
        new_cache.append(c)
    hidden = model.norm(x)
    if mats is None:
        return model.logits(hidden)[:, 0], new_cache
    return jnp.dot(hidden.astype(model.num.compute_dtype), mats.head)[:, 0], new_cache
