"""Reward throughput benchmark: math answers/s (DAPO, Math-Verify) and code programs/s.

Exposes `add_arguments(parser)` and `run(args) -> list[dict]` (the `flowrl-jax bench` protocol)
and `reward_throughput(...)` for direct use. Each row compares the RewardPool (`ours`) with a
serial in-process reference: plain `math_dapo_score` calls, in-process Math-Verify
(parse + verify in the main thread, as veRL's scorer does), unsandboxed `subprocess.run`.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

from flowrl_jax.rewards.code_reward import outputs_match
from flowrl_jax.rewards.math_dapo import math_dapo_score
from flowrl_jax.rewards.math_eval import boxed_gold
from flowrl_jax.rewards.pool import RewardPool

_FILLER = "We reason carefully about the problem and check each step. " * 30


def math_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(response, gold) pairs, about half correct, with LaTeX and plain answers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        gold = f"\\frac{{{a}}}{{{b}}}" if i % 3 == 0 else str(a * b)
        ans = gold if rng.random() < 0.5 else str(a * b + 1)
        out.append((f"{_FILLER}\nSo the result is $\\boxed{{{ans}}}$.\nAnswer: {ans}", gold))
    return out


def code_items(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """(response, tests) pairs: small stdin programs, 2 tests each, a quarter of them wrong."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        xs = [rng.randint(-1000, 1000) for _ in range(20)]
        body = "print(sum(map(int, input().split())))" if i % 4 else "print(max(map(int, input().split())))"
        tests = [{"input": " ".join(map(str, xs)) + "\n", "output": f"{sum(xs)}\n", "testtype": "stdin"},
                 {"input": "1 2 3\n", "output": "6\n", "testtype": "stdin"}]
        out.append((f"Solution:\n```python\nimport sys\n{body}\n```", {"tests": tests}))
    return out


def humaneval_items(n: int) -> list[tuple[str, dict]]:
    """HumanEval+-style items (numpy-importing check(), 20 asserted inputs), half of them wrong."""
    test = ("import numpy as np\n\ndef check(candidate):\n    inputs = [[i, i + 1] for i in range(20)]\n"
            "    for a, b in inputs:\n        assert np.allclose(candidate(a, b), a + b)\n")
    gt = {"test": test, "entry_point": "add", "prompt": "def add(a, b):\n"}
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    return [(good if i % 2 else bad, gt) for i in range(n)]


def _rate(n: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def _mv_reference(items: list[tuple[str, str]]) -> None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    for resp, gold in items:
        g = parse(boxed_gold(gold), extraction_config=[LatexExtractionConfig()])
        p = parse(resp, extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()])
        verify(g, p)


def _code_reference(items: list[tuple[str, dict]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for resp, gt in items:
            path = os.path.join(d, "prog.py")
            with open(path, "w") as f:
                f.write(resp.split("```python\n", 1)[1].rsplit("```", 1)[0])
            for t in gt["tests"]:
                r = subprocess.run([sys.executable, path], input=t["input"], capture_output=True,
                                   text=True, timeout=10)
                if r.returncode != 0 or not outputs_match(r.stdout, t["output"]):
                    break


def reward_throughput(n_math: int = 400, n_mv: int = 200, n_code: int = 32,
                      num_workers: int | None = None) -> list[dict[str, Any]]:
    """Measure answers/s and programs/s with a RewardPool against serial references."""
    workers = num_workers or os.cpu_count() or 1
    rows = []
    math = math_items(n_math)
    mv = math_items(n_mv, seed=1)
    code = code_items(n_code)
    with RewardPool(num_workers=workers) as pool:
        pool.score_batch([("math_verify", "\\boxed{1}", "1")] * workers)  # start workers
        pool.score_batch([("livecodebench", *code[0])])  # sandbox probe
        ours = _rate(n_math, lambda: pool.score_batch([("math_dapo", r, g) for r, g in math]))
        ref = _rate(n_math, lambda: [math_dapo_score(r, g) for r, g in math])
        rows.append({"case": "math_dapo", "ours": ours, "reference": ref, "unit": "answers/s",
                     "ratio": ours / ref, "workers": workers, "n": n_math,
                     "reference_kind": "serial in-process"})
        ours = _rate(n_mv, lambda: pool.score_batch([("math_verify", r, g) for r, g in mv]))
        _mv_reference(mv[:2])  # import sympy/math_verify outside the timed region
        ref = _rate(n_mv, lambda: _mv_reference(mv))
        rows.append({"case": "math_verify", "ours": ours, "reference": ref, "unit": "answers/s",
                     "ratio": ours / ref, "workers": workers, "n": n_mv,
                     "reference_kind": "serial in-process, no hard timeout"})
        ours = _rate(n_code, lambda: pool.score_batch([("livecodebench", r, g) for r, g in code]))
        ref = _rate(n_code, lambda: _code_reference(code))
        he = humaneval_items(max(2, n_code // 2))
        ours_he = _rate(len(he), lambda: pool.score_batch([("humanevalplus", r, g) for r, g in he]))
        rows.append({"case": "code_humaneval_numpy", "ours": ours_he, "reference": None,
                     "unit": "programs/s", "ratio": None, "workers": workers, "n": len(he),
                     "reference_kind": "none"})
        rows.append({"case": "code_stdin_2tests", "ours": ours, "reference": ref, "unit": "programs/s",
                     "ratio": ours / ref, "workers": workers, "n": n_code,
                     "reference_kind": "serial unsandboxed subprocess"})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the rewards benchmark."""
    parser.add_argument("--n-math", type=int, default=400, help="math_dapo answers to score")
    parser.add_argument("--n-mv", type=int, default=200, help="Math-Verify answers to score")
    parser.add_argument("--n-code", type=int, default=32, help="programs to run (2 tests each)")
    parser.add_argument("--workers", type=int, default=None, help="pool size (default: CPU count)")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`flowrl-jax bench rewards` entry point."""
    return reward_throughput(getattr(args, "n_math", 400), getattr(args, "n_mv", 200),
                             getattr(args, "n_code", 32), getattr(args, "workers", None))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    for row in run(ap.parse_args()):
        print(row)
