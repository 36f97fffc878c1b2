"""KV-cache memory an engine actually allocates, and the most samples it runs at once, measured
by running it (`bench rollout-memory`'s measured row).

`measure` wraps an engine's `init_state` and `_admit_batch` on the instance: both record the
bytes of the state's cache arrays (`cache`: the dense per-slot cache; `pool`: a paged
engine's page pool, whose state may come from its kernels' own initialiser), the second also
the active slots after each admission. Any engine with those
two methods can be measured: `dense_engine` and `paged_engine` build the two kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token
from flowrl_jax.sampling.params import SamplingParams


@dataclass(frozen=True)
class Measured:
    """What one engine run allocated for its KV cache and how many samples it ran at once."""

    cache_bytes: int  # the cache arrays' bytes (dense: every slot; paged: the pool)
    slots: int  # decode slots of the states it allocated
    peak_running: int  # the most samples active at once
    tokens: np.ndarray  # the run's responses, [rows, max_new_tokens]
    lengths: np.ndarray  # [rows]


def _cache_bytes(st: Any) -> int:
    arrays = st.cache if hasattr(st, "cache") else st.pool
    return sum(x.nbytes for x in jax.tree.leaves(arrays))


def measure(engine: Any, model: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]],
            sampling: SamplingParams) -> Measured:
    """Run `engine.generate` once, recording the cache arrays it allocates (summed over the
    states alive at once: decode groups each hold one) and its peak active slots."""
    cache_bytes: list[int] = []
    state_slots: list[int] = []
    admitted_bytes = [0]
    peak = [0]
    init_state, admit = engine.init_state, engine._admit_batch

    def recording_init(n_slots: int, *a: Any, **kw: Any):
        st = init_state(n_slots, *a, **kw)
        cache_bytes.append(_cache_bytes(st))
        state_slots.append(n_slots)
        return st

    def recording_admit(*a: Any, **kw: Any):
        st = admit(*a, **kw)
        peak[0] = max(peak[0], int(np.asarray(st.active).sum()))
        admitted_bytes[0] = max(admitted_bytes[0], _cache_bytes(st))
        return st

    engine.init_state, engine._admit_batch = recording_init, recording_admit
    try:
        out = engine.generate(nnx.state(model), prompts, sampling)
    finally:
        del engine.init_state, engine._admit_batch  # the class's methods again
    # states made by `init_state` (summed: decode groups hold one each at once), else the
    # largest state seen at an admission
    nbytes = sum(cache_bytes) if cache_bytes else admitted_bytes[0]
    return Measured(nbytes, sum(state_slots), peak[0], np.asarray(out.tokens),
                    np.asarray(out.lengths))


def dense_engine(model: Qwen2ForCausalLM, *, slots: int, decode_chunk: int,
                 prefill_buckets: Sequence[int], page_size: int = 64) -> SamplingEngine:
    """The dense engine (slots × full-length cache, whole pages of `page_size`), whatever
    the engine's default cache."""
    return SamplingEngine(model, kv_cache="dense", decode_slots=slots, decode_chunk=decode_chunk,
                          prefill_buckets=tuple(prefill_buckets), page_size=page_size,
                          verbose=False)


def paged_engine(model: Qwen2ForCausalLM, *, page_size: int, pool_pages: int,
                 decode_slots: int, decode_chunk: int,
                 prefill_buckets: Sequence[int]) -> SamplingEngine:
    """The paged engine with a pool of `pool_pages` usable pages (plus its null page)."""
    page_bytes = page_size * kv_bytes_per_token(model.arch, model.num.compute_dtype)
    return SamplingEngine(model, kv_cache="paged", page_size=page_size,
                          kv_cache_gib=(pool_pages + 1) * page_bytes / 2**30,
                          decode_slots=decode_slots, decode_chunk=decode_chunk,
                          prefill_buckets=tuple(prefill_buckets), verbose=False)
