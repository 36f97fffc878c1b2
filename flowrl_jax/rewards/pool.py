"""RewardPool: score many responses concurrently without blocking the trainer.

Worker threads dispatch by data source: `math_dapo` runs inline (microseconds), `math_verify`
goes to persistent Math-Verify processes with hard timeouts, code runs in sandboxed
subprocesses. Threads spend their time waiting on pipes, so the GIL is free for the trainer.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
from typing import Any, Iterable, Sequence

from flowrl_jax.rewards import registry
from flowrl_jax.rewards.code_reward import CodeLimits, score_code
from flowrl_jax.rewards.math_eval import MathVerifyScorer
from flowrl_jax.rewards.sandbox import SandboxConfig

_CODE_SOURCES = ("livecodebench", "codeforces", "humanevalplus", "humaneval")


def runs_code(data_source: str) -> bool:
    """True when `data_source` is scored by the built-in code reward (in the sandbox)."""
    fn = registry.get_reward(data_source)
    builtin_code = isinstance(fn, functools.partial) and fn.func is score_code
    return builtin_code and registry.resolve(data_source) in _CODE_SOURCES


class RewardPool:
    """Thread pool of reward workers; `submit` returns a Future, `score_batch` a list."""

    def __init__(self, num_workers: int | None = None, *, math_verify_workers: int | None = None,
                 math_verify_timeout_s: float = 10.0, sandbox: SandboxConfig | None = None,
                 code_limits: CodeLimits | None = None):
        n = num_workers if num_workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {n}")
        self.num_workers = n
        self._executor = cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="reward")
        # each Math-Verify process holds sympy (~100 MB): cap the default on many-core hosts
        mv_workers = math_verify_workers or min(n, os.cpu_count() or 1, 16)
        self._mv = MathVerifyScorer(num_workers=mv_workers,
                                    timeout_s=math_verify_timeout_s)
        self._sandbox = sandbox
        self._limits = code_limits or CodeLimits()

    @classmethod
    def from_config(cls, cfg: Any) -> "RewardPool":
        """Build from any object/dict with optional fields num_workers, math_verify_timeout_s,
        sandbox_memory_mb (missing fields take defaults)."""
        get = (cfg.get if isinstance(cfg, dict) else functools.partial(getattr, cfg))
        sandbox = SandboxConfig()
        mem = get("sandbox_memory_mb", None)
        if mem:
            sandbox = dataclasses.replace(sandbox, memory_mb=int(mem))
        return cls(get("num_workers", None), math_verify_timeout_s=float(get("math_verify_timeout_s", 10.0)),
                   sandbox=sandbox)

    def _score(self, data_source: str, response: str, ground_truth: Any) -> float:
        name = registry.resolve(data_source)
        fn = registry.get_reward(data_source)
        if name == "math_verify" and fn is registry.math_verify_score:
            return self._mv.score(response, ground_truth)
        if runs_code(data_source):
            return score_code(name, response, ground_truth, limits=self._limits, sandbox=self._sandbox)
        return float(fn(response, ground_truth))  # math_dapo and user-registered rewards

    def submit(self, data_source: str, response: str, ground_truth: Any) -> cf.Future:
        """Future[float] of one reward; errors (e.g. unknown data source) surface on .result()."""
        registry.resolve(data_source)  # fail fast on an unknown source
        return self._executor.submit(self._score, data_source, response, ground_truth)

    def score_batch(self, items: Iterable[Sequence[Any]]) -> list[float]:
        """Rewards of (data_source, response, ground_truth) triples, in order."""
        futures = [self.submit(*item) for item in items]
        out = []
        for i, fut in enumerate(futures):
            try:
                out.append(fut.result())
            except Exception as exc:
                raise RuntimeError(f"RewardPool: scoring item {i} failed: {exc}") from exc
        return out

    def close(self) -> None:
        """Wait for running work, then stop threads and Math-Verify processes."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._mv.close()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
