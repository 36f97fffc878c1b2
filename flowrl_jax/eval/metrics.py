"""Evaluation metrics: Avg@n, unbiased pass@k, per-benchmark summaries, Markdown tables.

Everything here is pure Python/NumPy (no JAX) so it can be used on any machine that
holds a `samples.jsonl`. A *sample record* is a dict with at least
``prompt_id``, ``sample_index`` and ``score``; ``num_tokens`` and ``finish_reason``
feed the length / truncation statistics. A sample counts as correct when
``score >= CORRECT_THRESHOLD`` (0.5), so 0/1 scorers and ±1 (DAPO) scorers both work.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from flowrl_jax.eval.codeforces import render_codeforces_markdown
from flowrl_jax.eval.suites import MATH_SIX

CORRECT_THRESHOLD = 0.5
PASS_KS = (1, 2, 4, 8, 16)
TRUNCATED_REASONS = ("length", "max_tokens", "truncated")


def is_correct(score: float) -> bool:
    """True when a score counts as a solve (score ≥ 0.5)."""
    return float(score) >= CORRECT_THRESHOLD


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k)/C(n, k), in the stable product form."""
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no cancellation.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_n(scores_per_problem: Sequence[Sequence[float]]) -> float:
    """Avg@n: mean correctness over a problem's samples, then mean over problems."""
    if not scores_per_problem:
        raise ValueError("avg_at_n needs at least one problem")
    per_problem = []
    for i, scores in enumerate(scores_per_problem):
        if len(scores) == 0:
            raise ValueError(f"avg_at_n: problem {i} has no samples")
        per_problem.append(sum(1.0 if is_correct(s) else 0.0 for s in scores) / len(scores))
    return sum(per_problem) / len(per_problem)


def group_by_problem(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Group sample records by prompt_id, each group sorted by sample_index."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[str(s["prompt_id"])].append(s)
    return {pid: sorted(g, key=lambda s: int(s["sample_index"])) for pid, g in groups.items()}


def summarize_benchmark(name: str, samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary dict of one benchmark: Avg@n, pass@k (every k ≤ n), mean length, truncation."""
    groups = group_by_problem(samples)
    if not groups:
        raise ValueError(f"benchmark {name!r} has no samples")
    ns = [len(g) for g in groups.values()]
    n_min = min(ns)
    scores = [[float(s["score"]) for s in g] for g in groups.values()]
    pass_k: dict[str, float] = {}
    # Every k ≤ n is kept (pass@k curves); render_markdown shows k in PASS_KS.
    for k in range(1, n_min + 1):
        vals = [pass_at_k(len(sc), sum(is_correct(x) for x in sc), k) for sc in scores]
        pass_k[str(k)] = sum(vals) / len(vals)
    flat = [s for g in groups.values() for s in g]
    lengths = [float(s["num_tokens"]) for s in flat if s.get("num_tokens") is not None]
    reasons = [s.get("finish_reason") for s in flat]
    return {
        "benchmark": name,
        "num_problems": len(groups),
        "num_samples": len(flat),
        "n": n_min,
        "n_max": max(ns),
        "avg_at_n": avg_at_n(scores),
        "pass_at_k": pass_k,
        "mean_response_length": (sum(lengths) / len(lengths)) if lengths else None,
        "truncation_rate": sum(r in TRUNCATED_REASONS for r in reasons) / len(reasons),
        "mean_score": sum(float(s["score"]) for s in flat) / len(flat),
    }


def math_average(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean of the six math benchmarks' Avg@n; lists any that are missing."""
    present = [b for b in MATH_SIX if b in summaries]
    missing = [b for b in MATH_SIX if b not in summaries]
    value = (sum(summaries[b]["avg_at_n"] for b in present) / len(present)) if present else None
    return {"value": value if not missing else None,
            "partial_value": value, "benchmarks": present, "missing": missing}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100.0 * x:.2f}"


def render_markdown(summaries: Mapping[str, Mapping[str, Any]],
                    extra: Mapping[str, Any] | None = None, ks: Sequence[int] = PASS_KS) -> str:
    """Markdown table: one row per benchmark (percentages), then the math average and notes."""
    ks_shown = sorted({int(k) for s in summaries.values() for k in s["pass_at_k"]
                       if int(k) in ks})
    head = ["benchmark", "problems", "n", "Avg@n"] + [f"pass@{k}" for k in ks_shown] + [
        "mean len", "trunc %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [name, str(s["num_problems"]), str(s["n"]), _pct(s["avg_at_n"])]
        row += [_pct(s["pass_at_k"].get(str(k))) for k in ks_shown]
        ml = s.get("mean_response_length")
        row += ["–" if ml is None else f"{ml:.1f}", _pct(s.get("truncation_rate"))]
        lines.append("| " + " | ".join(row) + " |")
    avg = math_average(summaries)
    out = "\n".join(lines) + "\n"
    if avg["benchmarks"]:
        if avg["missing"]:
            out += (f"\nMath average (partial, {len(avg['benchmarks'])}/6 benchmarks; missing "
                    f"{', '.join(avg['missing'])}): {_pct(avg['partial_value'])}\n")
        else:
            out += f"\n**Math average (6 benchmarks, Avg@n): {_pct(avg['value'])}**\n"
    cf = (extra or {}).get("codeforces")
    if cf:
        out += "\n" + render_codeforces_markdown(cf)
    return out
