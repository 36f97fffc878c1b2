"""Byte arithmetic of the paged KV cache: bytes per cached token, pages per length, and the
pages a memory budget buys (no device work: usable for estimates at any shape)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flowrl_jax.config import ModelArch


def kv_bytes_per_token(arch: ModelArch, dtype: Any) -> int:
    """Bytes one cached position takes over all layers, keys and values."""
    return (arch.num_hidden_layers * 2 * arch.num_key_value_heads * arch.resolved_head_dim
            * jnp.dtype(dtype).itemsize)


def pages_for(n_positions: int, page_size: int) -> int:
    """Pages that hold `n_positions` positions (ceil; 0 for 0)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    return -(-max(0, int(n_positions)) // int(page_size))


def pool_pages(budget_bytes: int, arch: ModelArch, dtype: Any, page_size: int) -> int:
    """Whole pages of `page_size` positions (all layers, keys + values) in `budget_bytes`."""
    return max(0, int(budget_bytes)) // (kv_bytes_per_token(arch, dtype) * int(page_size))
