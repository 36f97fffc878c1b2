"""Avg@n, pass@k and the summary/Markdown helpers against brute force and hand cases."""

import itertools
import math

import pytest

from flowrl_jax.eval import codeforces as cfx
from flowrl_jax.eval import metrics as ev


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    """Fraction of k-subsets with at least one correct sample (exact enumeration)."""
    subsets = list(itertools.combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) overflows floats; the product form must still match the log-space value.
    n, c, k = 1000, 3, 500
    log_ratio = (math.lgamma(n - c + 1) - math.lgamma(k + 1) - math.lgamma(n - c - k + 1)) - (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1))
    assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.exp(log_ratio), rel=1e-9)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_avg_at_n_hand_cases():
    # problem means 0.5, 1.0, 0.0 → 0.5 (mean of means, not pooled mean)
    assert ev.avg_at_n([[1, 0], [1, 1, 1, 1], [0]]) == pytest.approx(0.5)
    # pooled mean would be 5/7; per-problem mean is (0.25 + 1) / 2
    assert ev.avg_at_n([[1, 0, 0, 0], [1, 1, 1]]) == pytest.approx(0.625)
    # DAPO-style ±1 scores: -1 is wrong, +1 right
    assert ev.avg_at_n([[1, -1, -1, 1]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ev.avg_at_n([])


def _samples(bench_flags):
    out = []
    for pid, flags in bench_flags.items():
        for i, f in enumerate(flags):
            out.append({"prompt_id": pid, "sample_index": i, "score": float(f),
                        "num_tokens": 10 * (i + 1), "finish_reason": "length" if i == 0 else "stop"})
    return out


def test_summarize_benchmark_and_markdown():
    s = ev.summarize_benchmark("aime24", _samples({"a": [1, 0, 0, 1], "b": [0, 0, 0, 0]}))
    assert s["num_problems"] == 2 and s["n"] == 4
    assert s["avg_at_n"] == pytest.approx(0.25)
    assert s["pass_at_k"]["1"] == pytest.approx(0.25)
    assert s["pass_at_k"]["2"] == pytest.approx((1 - 1 / 6) / 2)  # 1 - C(2,2)/C(4,2) for a
    assert set(s["pass_at_k"]) == {"1", "2", "3", "4"}
    assert s["mean_response_length"] == pytest.approx(25.0)
    assert s["truncation_rate"] == pytest.approx(0.25)
    md = ev.render_markdown({"aime24": s})
    assert "| aime24 | 2 | 4 | 25.00 | 25.00 | 41.67 | 50.00 |" in md
    assert "pass@8" not in md and "missing" in md


def test_math_average_unweighted():
    sums = {b: {"avg_at_n": v, "num_problems": 10 ** i, "n": 1, "pass_at_k": {},
                "truncation_rate": 0.0}
            for i, (b, v) in enumerate(zip(ev.MATH_SIX, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))}
    avg = ev.math_average(sums)
    assert avg["value"] == pytest.approx(0.35) and avg["missing"] == []
    assert "Math average (6 benchmarks, Avg@n): 35.00" in ev.render_markdown(sums)
    del sums["aime25"]
    avg = ev.math_average(sums)
    assert avg["value"] is None and avg["missing"] == ["aime25"]
    assert avg["partial_value"] == pytest.approx((0.1 + 0.3 + 0.4 + 0.5 + 0.6) / 5)


def test_codeforces_summary_offline_proxy():
    ratings = {"1000": 2, "1500": 1, "2000": 1}
    attempts = {"1971A": [False, True], "1971B": [False, False], "1972A": [True, True]}
    cf = cfx.codeforces_summary(attempts, ["1971A", "1971B", "1972A", "1999C"], ratings)
    assert cf["num_contests"] == 2 and cf["solved_first_of_n"] == 2
    assert cf["pass_rate_by_index"] == {"A": pytest.approx(0.75), "B": 0.0}
    # contest 1971: 1/2 solved → 50 %, contest 1972: 100 % → mean 75 → 800 + 2200·0.75²
    assert cf["rating_proxy_percentile"] == pytest.approx(75.0)
    assert cf["rating_proxy"] == pytest.approx(800 + 2200 * 0.5625)
    assert cf["codeelo_rating"] is None and "NOT computed" in cf["note"]
    md = cfx.render_codeforces_markdown(cf)
    assert "NOT computed" in md and "| A | 75.00 |" in md
    assert cfx.rating_percentile(1500, cfx.load_sorted_ratings(ratings)) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="1971-A"):
        cfx.split_cf_id("1971-A")


def test_contest_performance_binary_search():
    # Brute force: largest integer R with expected seed >= rank.
    old = [1200.0, 1400.0, 1600.0, 1800.0, 2000.0]
    rows = [{"points": p, "penalty": 0} for p in (5, 4, 3, 2, 1)]
    perf = cfx.contest_performance(3.5, 0, rows, old)  # slots in at index 2
    seed = lambda r: 1 + sum(1 / (1 + 10 ** ((r - x) / 400)) for x in old)  # noqa: E731
    brute = max(r for r in range(0, 2101) if seed(r) >= 2)
    assert perf == brute
    st = {1971: {"problems": [{"index": "A"}, {"index": "B"}], "rows": rows, "old_ratings": old}}
    cf = cfx.codeforces_summary({"1971A": [False, True], "1971B": [False]}, ["1971A", "1971B"],
                               {str(int(r)): 1 for r in old}, standings=st)
    # score 1, penalty 10: rows with points < 1 … none; equal points 1 with penalty 0 < 10 → last
    assert cf["codeelo_per_contest"][1971] == cfx.contest_performance(1, 10, rows, old)
    assert cf["codeelo_rating"] is not None
