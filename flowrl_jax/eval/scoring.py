"""Scoring sampled responses with the reward functions, off the generation thread."""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable


def _score_one(data_source: str, text: str, ground_truth: Any) -> float:
    from flowrl_jax.rewards import score

    return float(score(data_source, text, ground_truth))


class Scorer:
    """Scores responses in worker processes (or inline), overlapping generation."""

    def __init__(self, workers: int, fn: Callable[[str, str, Any], float] = _score_one):
        import multiprocessing as mp

        self.fn = fn
        # spawn, not fork: forking a process that already runs JAX threads can deadlock.
        self.pool = (cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
                     if workers > 0 else None)

    def submit(self, data_source: str, text: str, ground_truth: Any) -> cf.Future:
        """Future of the score."""
        if self.pool is not None:
            return self.pool.submit(self.fn, data_source, text, ground_truth)
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(self.fn(data_source, text, ground_truth))
        except Exception as e:  # noqa: BLE001 - surfaced when the result is read
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        """Shut the pool down."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
