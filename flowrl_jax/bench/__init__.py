"""Benchmarks, each measured side by side with a reference in the same run.

Each bench is a module `flowrl_jax.bench.<name>` (listed in commands/bench.py) exposing
`add_arguments(parser)` (optional) and `run(args) -> list[dict]`: one dict per case with at
least `bench`, `ours`, `reference`, `unit`, `ratio` (ours ÷ reference) and the case's parameters.
"""

import time
from typing import Callable

def best_time(run: Callable[[], object], repeats: int, min_seconds: float = 0.0,
              max_runs: int = 200) -> float:
    """Seconds of the fastest of at least `repeats` calls of `run`, calling it again while
    less than `min_seconds` have passed in all (up to `max_runs`): on a shared machine the
    minimum of a few runs of a 10 ms case is mostly noise."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max(1, repeats) or (spent < min_seconds and runs < max_runs):
        t = time.perf_counter()
        run()
        dt = time.perf_counter() - t
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def add_dtype_argument(parser, what: str) -> None:
    """`--dtype auto|float32|bfloat16` for `what`; see `resolve_dtype`."""
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help=f"{what}; auto: float32 on CPU, bfloat16 on accelerators")


def resolve_dtype(dtype: str, platform: str) -> str:
    """`--dtype` on a JAX platform: "auto" is float32 on CPU and bfloat16 elsewhere (the
    matrix units' type)."""
    return ("float32" if platform == "cpu" else "bfloat16") if dtype == "auto" else dtype
