"""A continuous-batching simulation of a paged KV cache: how many samples can decode at once
in a pool of pages, given each sample's prompt and response length (`bench rollout-memory`).

The model of the engine (issue 19): one prefill per prompt, whose full pages (positions
0..L-2, the prompt body the prefill caches) are shared by its running samples and returned
with the last of them; each sample owns its partly filled last prompt page (copied on first
write) and the pages its response grows into, returned when it finishes. The host works in
decode chunks: a sample holds, during a chunk, the pages it reaches by the chunk's end; free
slots are refilled from the prompt-major queue between chunks. A sample that has generated t
tokens caches L - 1 + t positions (the newest token is fed, not yet cached).

`simulate_paged` runs a fixed number of slots and records the pages in use; `paged_capacity`
finds the most slots whose pages in use at steady state (the highest of the chunks while
samples still wait, after the first wave turned over) fit a pool: a paged engine with that
many slots never runs out of pages in steady state, so it needs no preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from flowrl_jax.errors import ConfigError


@dataclass(frozen=True)
class PagedSim:
    """Pages in use over a run of `slots` slots; `steady_*` over the steady-state chunks
    (samples still queued, after as many finished as the first wave admitted), or over every
    chunk when the batch never queued (`queued` False: the slots held all of it)."""

    slots: int
    steady_pages_max: int  # the most pages in use, shared prompt pages counted once
    steady_pages_mean: float
    steady_unshared_mean: float  # the same samples if each held its own prompt copy
    steady_running_mean: float  # samples decoding at once
    peak_pages: int
    chunks: int
    steady_chunks: int
    queued: bool


def _checked(prompt_lens: Sequence[int], response_lens: np.ndarray, page_size: int,
             chunk: int) -> tuple[np.ndarray, np.ndarray]:
    lens = np.asarray(response_lens, np.int64)
    plen = np.asarray(prompt_lens, np.int64)
    if lens.ndim != 2 or plen.ndim != 1 or lens.shape[0] != plen.shape[0]:
        raise ConfigError(f"response lengths {lens.shape} must be [prompts={plen.shape[0]}, G]")
    if lens.size == 0 or lens.min() < 1 or plen.min() < 1:
        raise ConfigError("every prompt and response length must be >= 1")
    if page_size <= 0 or chunk <= 0:
        raise ConfigError(f"page_size={page_size}, chunk={chunk}: both must be > 0")
    return plen, lens


def simulate_paged(prompt_lens: Sequence[int], response_lens: np.ndarray, page_size: int,
                   slots: int, chunk: int) -> PagedSim:
    """Run the work items (prompt p, sample s), `response_lens[p, s]` tokens each, through
    `slots` slots in prompt-major order, `chunk` decode steps between refills."""
    plen, lens = _checked(prompt_lens, response_lens, page_size, chunk)
    n_prompts, g = lens.shape
    total = n_prompts * g
    prompt_of = np.repeat(np.arange(n_prompts), g)
    length = lens.reshape(-1)
    body = plen - 1  # positions the prefill caches
    shared_p = body // page_size  # full pages: one copy per prompt
    shared_i, body_i = shared_p[prompt_of], body[prompt_of]
    running = np.zeros(0, np.int64)
    t = np.zeros(total, np.int64)
    refs = np.zeros(n_prompts, np.int64)  # running samples per prompt
    nxt = finished = 0
    hist: list[tuple[int, int, int, int, bool]] = []  # running, pages, unshared, finished, queued
    while finished < total:
        take = min(slots - running.size, total - nxt)
        if take > 0:
            new = np.arange(nxt, nxt + take)
            np.add.at(refs, prompt_of[new], 1)
            running = np.concatenate([running, new])
            nxt += take
        end = np.minimum(t[running] + chunk, length[running])
        own = -(-(body_i[running] + end) // page_size) - shared_i[running]
        live = np.nonzero(refs)[0]
        pages = int(own.sum() + shared_p[live].sum())
        unshared = int(own.sum() + shared_i[running].sum())
        hist.append((running.size, pages, unshared, finished, nxt < total))
        t[running] = end
        done = end >= length[running]
        np.add.at(refs, prompt_of[running[done]], -1)
        finished += int(done.sum())
        running = running[~done]
    h = np.array(hist, np.int64)
    steady = (h[:, 4] == 1) & (h[:, 3] >= h[0, 0])
    queued = bool(steady.any())
    if not queued:
        steady = np.ones(len(h), bool)
    sel = h[steady]
    return PagedSim(slots=slots, steady_pages_max=int(sel[:, 1].max()),
                    steady_pages_mean=float(sel[:, 1].mean()),
                    steady_unshared_mean=float(sel[:, 2].mean()),
                    steady_running_mean=float(sel[:, 0].mean()), peak_pages=int(h[:, 1].max()),
                    chunks=len(h), steady_chunks=int(steady.sum()), queued=queued)


def paged_capacity(prompt_lens: Sequence[int], response_lens: np.ndarray, page_size: int,
                   pool_pages: int, chunk: int) -> PagedSim:
    """The run with the most slots (up to the batch) whose steady-state pages fit
    `pool_pages` (bisection: pages in use grow with the slots)."""
    plen, lens = _checked(prompt_lens, response_lens, page_size, chunk)
    total = lens.size
    fits = lambda sim: sim.steady_pages_max <= pool_pages  # noqa: E731
    best = simulate_paged(plen, lens, page_size, 1, chunk)
    if not fits(best):
        raise ConfigError(f"a pool of {pool_pages} pages of {page_size} positions cannot run one "
                          f"sample ({best.steady_pages_max} pages): raise the budget")
    lo, hi = 1, total  # lo fits; find the largest that does
    top = simulate_paged(plen, lens, page_size, total, chunk)
    if fits(top):
        return top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        sim = simulate_paged(plen, lens, page_size, mid, chunk)
        if fits(sim):
            lo, best = mid, sim
        else:
            hi = mid
    return best
