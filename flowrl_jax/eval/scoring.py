"""Scoring sampled responses with the reward functions, off the generation thread."""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable

from flowrl_jax.data.extract import last_boxed
from flowrl_jax.rewards import SandboxConfig, resolve, runs_code, score_code
from flowrl_jax.rewards.math_dapo import extract_answer


def _score_one(data_source: str, text: str, ground_truth: Any) -> float:
    from flowrl_jax.rewards import score

    return float(score(data_source, text, ground_truth))


def sandboxed_score(sandbox: SandboxConfig) -> Callable[[str, str, Any], float]:
    """An inline scoring function whose code rewards run under `sandbox`."""
    def score_one(data_source: str, text: str, ground_truth: Any) -> float:
        if runs_code(data_source):
            return score_code(resolve(data_source), text, ground_truth, sandbox=sandbox)
        return _score_one(data_source, text, ground_truth)

    return score_one


def gold_answer(ground_truth: Any) -> str | None:
    """The reference answer written next to each sample: text/number golds; None for code
    (its ground truth is a test suite, kept out of samples.jsonl)."""
    if isinstance(ground_truth, (str, int, float)) and not isinstance(ground_truth, bool):
        return str(ground_truth)
    return None


def extracted_answer(text: str, ground_truth: Any) -> str | None:
    """The answer a math response commits to: its last \\boxed{}, else a final "Answer:"
    line (DAPO style); None for code or when the response states none."""
    if gold_answer(ground_truth) is None:
        return None
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else extract_answer(text)


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
