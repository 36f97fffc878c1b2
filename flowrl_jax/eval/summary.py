"""From scored samples to ``summary.json``, ``results.md`` and one ``<bench>.md`` per benchmark:
Avg@n / pass@k, the math average, diversity, Codeforces extras and the optional LLM judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from flowrl_jax.eval import codeforces as cfx
from flowrl_jax.eval import diversity as dv
from flowrl_jax.eval import judge as jg
from flowrl_jax.eval import metrics as ev
from flowrl_jax.eval.records import Problem


def summarize(problems: Sequence[Problem], samples: Sequence[dict[str, Any]],
              diversity_on: Sequence[str], data_dir: Path | None,
              judge_cfg: jg.JudgeConfig | None = None,
              cf_standings: dict | None = None,
              self_bleu_variant: str = "add1") -> dict[str, Any]:
    """summary.json content from the scored samples of the requested problems."""
    wanted = {(p.benchmark, p.prompt_id) for p in problems}
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        if (s["benchmark"], str(s["prompt_id"])) in wanted:
            by_bench.setdefault(s["benchmark"], []).append(s)
    order = list(dict.fromkeys(p.benchmark for p in problems))
    benches = {b: ev.summarize_benchmark(b, by_bench[b]) for b in order if b in by_bench}
    out: dict[str, Any] = {"benchmarks": benches, "math_average": ev.math_average(benches)}
    div = {b: dv.benchmark_diversity(by_bench[b], self_bleu_variant=self_bleu_variant)
           for b in order if b in by_bench and b in diversity_on}
    if div:
        out["diversity"] = {b: {"mean": d["mean"], "self_bleu_variant": d["self_bleu_variant"]}
                            for b, d in div.items()}
        out["diversity_per_problem"] = {b: d["per_problem"] for b, d in div.items()}
    if "codeforces" in by_bench and data_dir is not None:
        out["codeforces"] = _codeforces(by_bench["codeforces"], data_dir, cf_standings)
    if judge_cfg is not None and div:
        texts = {p.prompt_id: p.problem_text for p in problems}
        res = {}
        for b in div:
            groups = ev.group_by_problem(by_bench[b])
            res[b] = jg.judge_benchmark(judge_cfg, texts,
                                        {pid: [s["text"] for s in g] for pid, g in groups.items()})
        out["judge"] = {"enabled": True, "per_benchmark": res,
                        "mean_score": _mean([r["mean_score"] for r in res.values()]),
                        "num_scored": sum(r["num_scored"] for r in res.values()),
                        "num_failed": sum(r["num_failed"] for r in res.values())}
    return out


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _codeforces(samples: Sequence[dict[str, Any]], data_dir: Path,
                standings: dict | None) -> dict[str, Any]:
    """Codeforces extras: prompt ids map to metadata_cf.json ids by position when numeric."""
    cf_dir = data_dir / "codeforces"
    try:
        meta = json.loads((cf_dir / "metadata_cf.json").read_text())
        ratings = json.loads((cf_dir / "ratings_2024.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"{cf_dir}: cannot read metadata_cf.json/ratings_2024.json ({e})",
                "note": cfx.CODEELO_NOT_DONE}
    groups = ev.group_by_problem(samples)
    attempts: dict[str, list[bool]] = {}
    for pid, g in groups.items():
        cf_id = _cf_id(pid, meta)
        if cf_id is not None:
            attempts[cf_id] = [ev.is_correct(s["score"]) for s in g]
    return cfx.codeforces_summary(attempts, meta, ratings, standings)


def _cf_id(prompt_id: str, meta: Sequence[str]) -> str | None:
    if prompt_id in meta:
        return prompt_id
    tail = prompt_id.rsplit("-", 1)[-1].rsplit("/", 1)[-1]
    if tail.isdigit() and int(tail) < len(meta):
        return meta[int(tail)]
    return None


def write_outputs(out: Path, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """summary.json, results.md and one <bench>.md per benchmark."""
    summary = {**meta, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    benches = summary["benchmarks"]
    extra = {"codeforces": summary.get("codeforces")} if summary.get("codeforces", {}).get(
        "num_problems") is not None else None
    md = [f"# Evaluation of `{meta.get('model')}`", "", ev.render_markdown(benches, extra)]
    if "diversity" in summary:
        md += ["## Diversity (judge-free, mean over problems)", ""]
        variant = next(iter(summary["diversity"].values())).get("self_bleu_variant")
        if variant:
            md += [f"self_bleu: {variant}", ""]
        keys = ["distinct_1", "distinct_2", "distinct_3", "self_bleu", "self_bleu_300",
                "distinct_answers", "distinct_correct_paths"]
        md += ["| benchmark | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for b, d in summary["diversity"].items():
            md.append(f"| {b} | " + " | ".join(
                "–" if d["mean"].get(k) is None else f"{d['mean'][k]:.3f}" for k in keys) + " |")
        md.append("")
    if summary.get("judge"):
        md.append(f"LLM-judge diversity (1–5): {summary['judge'].get('mean_score')}")
    (out / "results.md").write_text("\n".join(md) + "\n")
    for b, s in benches.items():
        (out / f"{b}.md").write_text(ev.render_markdown({b: s}))
