"""KV-cache memory arithmetic shared by the paged engine's pool sizing and `bench
rollout-memory`: bytes per cached token, pages per sequence, pages a byte budget buys (no
device work: usable for estimates at any shape)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flowrl_jax.config import ModelArch


def kv_bytes_per_token(arch: ModelArch, dtype: Any) -> int:
    """Bytes one cached position takes over all layers: keys + values of the kv heads only
    (grouped-query attention caches num_key_value_heads, not num_attention_heads)."""
    return (arch.num_hidden_layers * 2 * arch.num_key_value_heads * arch.resolved_head_dim
            * jnp.dtype(dtype).itemsize)


def pages_for(n_positions: int, page_size: int) -> int:
    """Pages holding `n_positions` positions: ceil(n_positions / page_size) (0 for none)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    return -(-max(0, int(n_positions)) // int(page_size))


def pool_pages(budget_bytes: int, arch: ModelArch, dtype: Any, page_size: int) -> int:
    """Whole pages of `page_size` positions (all layers, keys + values) in `budget_bytes`."""
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    return max(0, int(budget_bytes)) // (int(page_size) * kv_bytes_per_token(arch, dtype))
