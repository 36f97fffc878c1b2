"""KV-cache memory an engine actually allocates, and the most samples it runs at once, measured
by running it (`bench rollout-memory`'s measured row).

Dense: a `SamplingEngine` whose `init_state` and `_admit_batch` are wrapped on the instance to
record the cache arrays' bytes and the active slots after each admission. Paged: any engine a
`PagedFactory` builds that reports its own figures through `memory_stats()` (`PagedProbe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.params import SamplingParams
from flowrl_jax.sampling.results import Rollout


@dataclass(frozen=True)
class Measured:
    """What one engine run allocated for its KV cache and how many samples it ran at once."""

    cache_bytes: int  # the cache arrays' bytes (dense: every slot; paged: the pool)
    slots: int  # decode slots the run had
    peak_running: int  # the most samples active at once
    tokens: np.ndarray  # the run's responses, [rows, max_new_tokens]
    lengths: np.ndarray  # [rows]


def measure_dense(model: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]],
                  sampling: SamplingParams, slots: int, decode_chunk: int,
                  prefill_buckets: Sequence[int]) -> Measured:
    """Run the dense engine with `slots` decode slots and record its cache arrays' bytes and
    its peak active slots."""
    eng = SamplingEngine(model, decode_slots=slots, decode_chunk=decode_chunk,
                         prefill_buckets=tuple(prefill_buckets), verbose=False)
    cache_bytes: list[int] = []
    state_slots: list[int] = []
    peak = [0]
    init_state, admit = eng.init_state, eng._admit_batch

    def recording_init(n_slots: int, length: int):
        st = init_state(n_slots, length)
        cache_bytes.append(sum(x.nbytes for x in jax.tree.leaves(st.cache)))
        state_slots.append(n_slots)
        return st

    def recording_admit(*a: Any, **kw: Any):
        st = admit(*a, **kw)
        peak[0] = max(peak[0], int(np.asarray(st.active).sum()))
        return st

    eng.init_state, eng._admit_batch = recording_init, recording_admit
    out = eng.generate(nnx.state(model), prompts, sampling)
    # decode groups (CPU fast path) each hold a state at once: their caches add up
    return Measured(sum(cache_bytes), sum(state_slots), peak[0], np.asarray(out.tokens),
                    np.asarray(out.lengths))


class PagedProbe(Protocol):
    """A paged engine as `measure_paged` drives it."""

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> Rollout: ...

    def memory_stats(self) -> dict:
        """At least `pool_bytes` (the page pool's arrays, all layers, keys + values) and
        `peak_running` (the most samples decoding at once) of the last `generate`."""


#: builds a paged engine: factory(model, page_size=, pool_pages=, decode_slots=, decode_chunk=)
PagedFactory = Callable[..., PagedProbe]


def measure_paged(factory: PagedFactory, model: Qwen2ForCausalLM,
                  prompts: Sequence[Sequence[int]], sampling: SamplingParams, page_size: int,
                  pool_pages: int, slots: int, decode_chunk: int) -> Measured:
    """Run a paged engine from `factory` and read its own memory figures."""
    eng = factory(model, page_size=page_size, pool_pages=pool_pages, decode_slots=slots,
                  decode_chunk=decode_chunk)
    out = eng.generate(nnx.state(model), prompts, sampling)
    stats = eng.memory_stats()
    return Measured(int(stats["pool_bytes"]), slots, int(stats["peak_running"]),
                    np.asarray(out.tokens), np.asarray(out.lengths))


#: set at merge to the paged engine's factory; None: the measured row has no paged figures
PAGED_FACTORY: Optional[PagedFactory] = None
