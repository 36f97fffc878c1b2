"""The decode step over a paged KV cache: one pool of fixed-size pages per layer and a page
table per sample (the sampler's paged engine, sampling/paged_kernels.py, runs it).

Layout. A pool holds keys and values [pages, kv_heads, head_dim, page_size]: each page is a
small heads-major, position-minor block of the dense decode layout (models/decode.py), so
position t of a sample lives at page `table[t // page_size]`, column `t % page_size`.
Gathering a sample's pages in table order gives exactly its dense cache row
[kv_heads, head_dim, pages × page_size], and `decode_attention` runs on that unchanged: the
paged step computes the same numbers as `decode_forward` (bit for bit when both attend over
the same length: the sampler's dense rows are whole pages, engine.py `cache_length`), and
entries past a sample's position are masked whatever page they read.

`paged_decode_forward(impl=)` picks the attention: "xla" (this layout, every platform) or
"pallas" (JAX's Pallas kernels over their own pool layout, models/paged_pallas.py).

Sharding. On a mesh the xla layout's pages axis is split over the same mesh axes as the decode
slots, in blocks: shard i holds pages [i·n, (i+1)·n) of the global pool and the slots of
block i, and their page tables hold shard-LOCAL page numbers (each shard has its own null
page, local 0). `paged_decode_forward` then runs each layer's write and gather inside
`per_shard` (a `jax.shard_map` over the slot axes, sampling/paged_kernels.py), so no chip
ever reads another chip's pages; with one shard `per_shard` is the identity. The Pallas
layout's pool is split the same way (its pages axis is dim 1): per shard, the token write and
the kernel call on the shard's block.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from flowrl_jax.config import ModelArch
from flowrl_jax.models import paged_pallas
from flowrl_jax.models.decode import DecodeMatrices, decode_attention, decode_layers
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM

Array = jax.Array

#: logical axes of a page pool's keys and values: pages split over the slot (`batch`) axes,
#: one block of pages per slot shard (the kernels take the exact axes from the slots'
#: sharding), heads over `tensor`
POOL_AXES = ("batch", "kv_heads", "head_dim", None)

#: implementations of `paged_decode_forward`: "xla" gathers this layout's pages and runs the
#: dense decode attention (every platform); "pallas" runs JAX's paged-attention kernels over
#: the kernel layout (models/paged_pallas.py: KernelPagedCache pools)
ATTENTION_IMPLS = ("xla", "pallas")


class PagedCache(NamedTuple):
    """One layer's page pool: keys k and values v, both [pages, kv_heads, head_dim, page_size]."""

    k: Array
    v: Array

    @property
    def page_size(self) -> int:
        """Positions per page."""
        return self.v.shape[3]

    @property
    def num_pages(self) -> int:
        """Pages in the pool (page 0, the null page, included)."""
        return self.v.shape[0]


def pool_shape(arch: ModelArch, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """Shape of one layer's key (and value) pool: [pages, kv_heads, head_dim, page_size]."""
    return (num_pages, arch.num_key_value_heads, arch.resolved_head_dim, page_size)


def empty_pool(arch: ModelArch, num_pages: int, page_size: int, dtype: Any) -> list[PagedCache]:
    """A zeroed page pool, one `PagedCache` per layer."""
    shape = pool_shape(arch, num_pages, page_size)
    return [PagedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(arch.num_hidden_layers)]


def gather_rows(pool: Array, table: Array) -> Array:
    """The dense rows [B, kv_heads, head_dim, pages × page_size] of page tables `table`
    [B, pages] over one pool array [pages_in_pool, kv_heads, head_dim, page_size]."""
    g = pool[table]  # [B, T, K, D, P]
    b, t, k, d, p = g.shape
    return g.transpose(0, 2, 3, 1, 4).reshape(b, k, d, t * p)


def paged_attention(q: Array, pool: PagedCache, table: Array, visible: Array, products: str,
                    impl: str = "xla") -> Array:
    """One query token's attention over each sample's pages: q [B, K, G, D], page tables
    `table` [B, T], visible [B, 1, 1, T × page_size] → [B, K, G, D] float32."""
    if impl != "xla":
        raise ValueError(f"paged_attention: unknown impl {impl!r}; use 'xla' (the kernels: "
                         f"paged_pallas.paged_attention)")
    return decode_attention(q, gather_rows(pool.k, table), gather_rows(pool.v, table), visible,
                            products)


def write_token(pool: PagedCache, k: Array, v: Array, page: Array, col: Array) -> PagedCache:
    """The pool with keys k and values v [B, kv_heads, head_dim] written at column `col` [B]
    of page `page` [B] (in place when donated; idle rows aim at the null page)."""
    return PagedCache(pool.k.at[page, :, :, col].set(k.astype(pool.k.dtype)),
                      pool.v.at[page, :, :, col].set(v.astype(pool.v.dtype)))


#: wraps a per-shard layer function (pool, q, k, v, page, col, table, visible mask (xla) or
#: lengths (pallas)) → (attention, pool) so that it runs on each shard's slots and pages
PerShard = Callable[[Callable[..., tuple[Array, PagedCache]]], Callable[..., tuple[Array, PagedCache]]]


def paged_decode_forward(model: Qwen2ForCausalLM, token: Array, pos: Array, page: Array,
                         pools: list[Any], table: Array, rope: tuple[Array, Array],
                         mats: Optional[DecodeMatrices], products: str,
                         impl: str = "xla", per_shard: Optional[PerShard] = None,
                         active: Optional[Array] = None) -> tuple[Array, list[Any]]:
    """One decode step: logits [B, V] of `token` [B] at position `pos` [B], and the pools with
    this token's keys and values written at column pos % page_size of page `page` [B].

    `decode_forward` (models/decode.py) with the cache row read through the page table
    `table` [B, T]; `rope`, `mats` and `products` as there. `impl` "xla" over `PagedCache`
    pools, "pallas" over `paged_pallas.KernelPagedCache` pools. `per_shard` (None: one shard)
    maps each layer's write + attention over the slot shards of a sharded pool (`page` and
    `table` then hold shard-local page numbers). `active` [B] (None: all): the kernels skip
    the other rows (length 0; their logits are meaningless).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"paged_decode_forward: unknown impl {impl!r}; "
                         f"use one of {ATTENTION_IMPLS}")
    col = pos % pools[0].page_size
    s = table.shape[1] * pools[0].page_size
    visible = (jnp.arange(s)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]

    def layer(pool: PagedCache, q: Array, k: Array, v: Array, page: Array, col: Array,
              table: Array, visible: Array) -> tuple[Array, PagedCache]:
        pool = write_token(pool, k, v, page, col)
        return paged_attention(q, pool, table, visible, products, impl), pool

    def kernel_layer(pool: Any, q: Array, k: Array, v: Array, page: Array, col: Array,
                     table: Array, lengths: Array) -> tuple[Array, Any]:
        pool = paged_pallas.write_token(pool, k, v, page, col)
        # mapped per shard: the kernel on this shard's block; else its own per-device map
        return paged_pallas.paged_attention(q, pool, table, lengths,
                                            per_device=per_shard is not None), pool

    one = layer
    if impl == "pallas":  # the kernels take each row's visible length (0: idle, skipped)
        one = kernel_layer
        visible = pos + 1 if active is None else jnp.where(active, pos + 1, 0)
    run = one if per_shard is None else per_shard(one)

    def attend(i: int, q: Array, k: Array, v: Array) -> tuple[Array, Any]:
        return run(pools[i], q, k, v, page, col, table, visible)

    return decode_layers(model, token, pos, rope, mats, attend)
