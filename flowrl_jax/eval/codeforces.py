"""Codeforces extras of an evaluation: per-problem and per-index pass rates, an offline rating
proxy, and the CodeElo performance rating when the user supplies cached contest standings."""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

CODEELO_NOT_DONE = (
    "CodeElo rating (SPEC §6) is NOT computed: it needs each contest's live standings "
    "and rating changes from the Codeforces API (contest.standings / contest.ratingChanges), "
    "which are not shipped and not reachable offline. The offline rating proxy reported here is a "
    "stand-in (per-contest solved fraction mapped through the rllm/DeepCoder percentile→rating "
    "curve) and is NOT comparable to the paper's CodeForces ratings. Pass cached standings "
    "with --cf-standings to compute the real per-contest performance rating."
)

_CF_ID = re.compile(r"^(\d+)([A-Z]\w*)$")


def split_cf_id(problem_id: str) -> tuple[int, str]:
    """'1971D1' → (1971, 'D1'); raises on a malformed id."""
    m = _CF_ID.match(problem_id)
    if not m:
        raise ValueError(f"malformed Codeforces problem id {problem_id!r} (expected e.g. '1971A')")
    return int(m.group(1)), m.group(2)


def load_sorted_ratings(ratings: Mapping[str, int]) -> list[float]:
    """Expand the {rating: count} histogram of ratings_2024.json into a sorted list."""
    out: list[float] = []
    for r, c in ratings.items():
        out.extend([float(r)] * int(c))
    return sorted(out)


def rating_percentile(rating: float, sorted_ratings: Sequence[float]) -> float:
    """Percent of rated users strictly below `rating` (0–100)."""
    if not sorted_ratings:
        raise ValueError("empty rating distribution")
    return 100.0 * bisect.bisect_left(sorted_ratings, float(rating)) / len(sorted_ratings)


def percentile_to_rating(percentile: float) -> float:
    """rllm/DeepCoder's percentile→Elo curve: 800 + 2200·(p/100)²."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return 800.0 + 2200.0 * (percentile / 100.0) ** 2


def first_pass_attempt(attempts: Sequence[bool]) -> int | None:
    """Index of the first passing attempt (CodeElo: first of n), None when none pass."""
    for i, ok in enumerate(attempts):
        if ok:
            return i
    return None


def contest_performance(score: float, penalty: float, rows: Sequence[Mapping[str, float]],
                        old_ratings: Sequence[float]) -> int:
    """Performance rating for one contest from its standings (CodeElo/rllm method).

    `rows` are the rated participants' standings rows (``points``, ``penalty``) sorted by
    rank, `old_ratings` their pre-contest ratings. The model's rank is where it would slot
    into the standings; the rating is the largest R whose expected seed
    1 + Σ_i 1/(1+10^((R−r_i)/400)) is still ≥ that rank (binary search on integers).
    """
    if len(rows) != len(old_ratings) or not rows:
        raise ValueError("standings rows and old ratings must be non-empty and the same length")
    rank = len(rows)
    for i, row in enumerate(rows):
        if row["points"] < score or (row["points"] == score and row["penalty"] > penalty):
            rank = i
            break
    lo, hi = 0, int(max(old_ratings)) + 100
    while hi - lo > 1:
        mid = (lo + hi) // 2
        seed = 1.0 + sum(1.0 / (1.0 + 10.0 ** ((mid - r) / 400.0)) for r in old_ratings)
        if seed < rank:
            hi = mid
        else:
            lo = mid
    return lo


def codeforces_summary(attempts: Mapping[str, Sequence[bool]], problem_ids: Sequence[str],
                       ratings: Mapping[str, int],
                       standings: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per-problem pass rates, per-index-letter pass rates and the offline rating estimates.

    `attempts` maps a problem id (e.g. '1971A') to its n pass/fail flags in sample order.
    The shipped data has no difficulty/rating field, so the "difficulty" breakdown uses
    the problem's index letter (A easiest … H hardest within a contest).
    """
    sorted_ratings = load_sorted_ratings(ratings)
    per_problem = {pid: (sum(map(bool, a)) / len(a) if a else 0.0) for pid, a in attempts.items()}
    by_letter: dict[str, list[float]] = defaultdict(list)
    by_contest: dict[int, dict[str, Sequence[bool]]] = defaultdict(dict)
    for pid in problem_ids:
        if pid not in attempts:
            continue
        cid, idx = split_cf_id(pid)
        by_letter[idx[0]].append(per_problem[pid])
        by_contest[cid][pid] = attempts[pid]
    # Offline proxy: percentile in a contest := percent of its (shipped) problems solved
    # by the first-of-n criterion; averaged over contests and mapped by the rllm curve.
    contest_pcts = []
    for cid, probs in by_contest.items():
        solved = sum(first_pass_attempt(a) is not None for a in probs.values())
        contest_pcts.append(100.0 * solved / len(probs))
    avg_pct = sum(contest_pcts) / len(contest_pcts) if contest_pcts else None
    out: dict[str, Any] = {
        "num_problems": len(per_problem),
        "num_contests": len(by_contest),
        "pass_rate_per_problem": per_problem,
        "pass_rate_by_index": {k: sum(v) / len(v) for k, v in sorted(by_letter.items())},
        "solved_first_of_n": sum(first_pass_attempt(a) is not None for a in attempts.values()),
        "rating_proxy": None if avg_pct is None else percentile_to_rating(avg_pct),
        "rating_proxy_percentile": avg_pct,
        "codeelo_rating": None,
        "note": CODEELO_NOT_DONE,
    }
    if standings:
        out.update(_codeelo_from_standings(by_contest, standings, sorted_ratings))
    return out


def _codeelo_from_standings(by_contest: Mapping[int, Mapping[str, Sequence[bool]]],
                            standings: Mapping[int, Mapping[str, Any]],
                            sorted_ratings: Sequence[float]) -> dict[str, Any]:
    """CodeElo/rllm rating when the user supplies cached standings per contest.

    Each standings entry: {"problems": [{"index": "A", "points"?: float}], "rows":
    [{"points", "penalty"}], "old_ratings": [..]} (already filtered to rated users).
    Score: Σ max(0, points − 50·i) for point-scored contests, else +1 and penalty 10·i,
    with i the first passing attempt.
    """
    perfs = {}
    for cid, probs in by_contest.items():
        st = standings.get(cid) or standings.get(str(cid))  # type: ignore[call-overload]
        if not st:
            continue
        score = penalty = 0.0
        for p in st["problems"]:
            pid = f"{cid}{p['index']}"
            first = first_pass_attempt(probs.get(pid, ()))
            if first is None:
                continue
            if "points" in p and p["points"] is not None:
                score += max(0.0, float(p["points"]) - 50.0 * first)
            else:
                score += 1
                penalty += 10 * first
        perfs[cid] = contest_performance(score, penalty, st["rows"], st["old_ratings"])
    if not perfs:
        return {}
    pcts = [rating_percentile(r, sorted_ratings) for r in perfs.values()]
    avg = sum(pcts) / len(pcts)
    return {"codeelo_rating": percentile_to_rating(avg), "codeelo_percentile": avg,
            "codeelo_contests": len(perfs), "codeelo_per_contest": perfs,
            "note": "CodeElo rating computed from user-supplied cached standings "
                    f"({len(perfs)} contests)."}


def render_codeforces_markdown(cf: Mapping[str, Any]) -> str:
    """Markdown block for the Codeforces extras (pass rate by index, rating estimates, note)."""
    lines = ["### Codeforces", "",
             f"Problems: {cf['num_problems']} in {cf['num_contests']} contests; solved "
             f"(first passing attempt of n): {cf['solved_first_of_n']}.", ""]
    if cf.get("pass_rate_by_index"):
        lines += ["| problem index | pass rate % |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in cf["pass_rate_by_index"].items()]
        lines.append("")
    if cf.get("rating_proxy") is not None:
        lines.append(f"Offline rating proxy: {cf['rating_proxy']:.0f} "
                     f"(mean per-contest solved percentile {cf['rating_proxy_percentile']:.1f}).")
    if cf.get("codeelo_rating") is not None:
        lines.append(f"CodeElo rating (cached standings): {cf['codeelo_rating']:.0f}.")
    lines += ["", f"> {cf['note'] if cf.get('codeelo_rating') is not None else CODEELO_NOT_DONE}",
              ""]
    return "\n".join(lines)

