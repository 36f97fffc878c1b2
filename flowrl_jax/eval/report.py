"""Side-by-side comparison report of several runs (e.g. FlowRL vs GRPO): Markdown + PNG plots.

On-disk layout read here (anything missing is reported as a note, never fatal):

* an *eval dir* (written by ``flowrl-jax eval``) holds ``summary.json`` (keys
  ``benchmarks`` {name: summary}, ``math_average``, optional ``diversity`` {name:
  mean metrics}, optional ``codeforces``, optional ``judge``) and ``samples.jsonl``;
  and ``eval_config.json`` (the model digest and the sampling settings; ``COMPARED`` keys
  must agree between runs, or the report is refused unless ``allow_mixed``);
* a *run dir* (written by ``flowrl-jax train``) holds ``metrics.jsonl``, one JSON object per
  rollout step with ``step`` and metrics such as ``reward/mean``,
  ``response_length/mean``, ``kl/ref`` and, after periodic validation,
  ``val/<set>/accuracy``; its evaluations live in ``eval/`` (an eval dir
  itself, or one eval dir per subfolder, e.g. ``eval/step_200/``; the last in natural
  name order, step_1000 after step_200, is used);
* a directory given on the command line may be either kind.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from flowrl_jax.eval.metrics import PASS_KS, math_average
from flowrl_jax.eval.suites import MATH_SIX
from flowrl_jax.run_files import read_metrics

# Training-curve panels: title → metric keys tried in order (first present wins).
CURVES: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean", "reward", "rewards/mean", "train/reward"),
    "response length": ("response_length/mean", "response_length", "length/mean"),
    "KL to ref": ("kl/ref", "kl_ref", "kl/ref_mean", "actor/kl_ref"),
}
# eval_config.json keys that make two evaluations comparable (a key a run lacks, e.g. an
# eval written before it was recorded, is "unknown" and compared among the others only).
COMPARED = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "limit", "benchmarks")
DIVERSITY_BARS = ("distinct_1", "distinct_2", "distinct_3", "self_bleu", "distinct_answers",
                  "distinct_correct_paths")


@dataclass
class RunData:
    """What was found for one run directory."""

    label: str
    path: Path
    summary: dict[str, Any] | None = None
    eval_config: dict[str, Any] | None = None
    eval_dir: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _natural_key(p: Path) -> list:
    """'step_200' < 'step_1000' (numbers compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name)]


def _find_eval_dir(run: Path) -> Path | None:
    if (run / "summary.json").is_file():
        return run
    ev = run / "eval"
    if (ev / "summary.json").is_file():
        return ev
    if ev.is_dir():
        subs = sorted((p for p in ev.iterdir() if (p / "summary.json").is_file()),
                      key=_natural_key)
        if subs:
            return subs[-1]
    return None


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Collect summary.json and metrics.jsonl of one run/eval directory."""
    p = Path(path)
    run = RunData(label=label or p.resolve().name, path=p)
    if not p.is_dir():
        run.notes.append(f"{p}: not a directory")
        return run
    run.eval_dir = _find_eval_dir(p)
    if run.eval_dir is None:
        run.notes.append(f"{p}: no eval results (no summary.json here or under eval/)")
    else:
        try:
            run.summary = json.loads((run.eval_dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            run.notes.append(f"{run.eval_dir / 'summary.json'}: unreadable ({e})")
        cfg_path = run.eval_dir / "eval_config.json"
        try:
            run.eval_config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            run.notes.append(f"{cfg_path}: missing, so this run's eval settings are unknown "
                             f"and not checked against the others")
        except (OSError, json.JSONDecodeError) as e:
            run.notes.append(f"{cfg_path}: unreadable ({e}); eval settings not checked")
    mfile = p / "metrics.jsonl"
    if mfile.is_file():
        run.metrics = read_metrics(mfile, notes=run.notes)
    else:
        run.notes.append(f"{p}: no metrics.jsonl (training curves skipped for this run)")
    return run


_UNKNOWN = object()  # a setting the run's eval_config.json does not record


def _setting(r: RunData, key: str) -> Any:
    """A run's eval setting (benchmarks as a sorted list), or the _UNKNOWN marker."""
    cfg = r.eval_config or {}
    if key not in cfg:
        return _UNKNOWN
    v = cfg[key]
    return sorted(v) if key == "benchmarks" and isinstance(v, list) else v


def mixed_settings(runs: Sequence[RunData]) -> dict[str, dict[str, Any]]:
    """{setting: {run label: value}} for every COMPARED setting on which the runs with
    evaluations disagree (runs that do not record the setting are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for key in COMPARED:
        vals = {r.label: _setting(r, key) for r in runs if r.summary is not None}
        known = {lab: v for lab, v in vals.items() if v is not _UNKNOWN}
        if len({json.dumps(v, sort_keys=True) for v in known.values()}) > 1:
            out[key] = known
    return out


def _settings_table(runs: Sequence[RunData], mixed: Mapping[str, Any]) -> list[str]:
    """Markdown: each run's eval settings; a ⚠ marks the columns that differ."""
    head = [f"{k} ⚠" if k in mixed else k for k in COMPARED]
    md = ["", "## Evaluation settings", "", "| run | " + " | ".join(head) + " |",
          "|---|" + "---|" * len(COMPARED)]
    for r in runs:
        if r.summary is None:
            continue
        cells = []
        for k in COMPARED:
            v = _setting(r, k)
            cells.append("?" if v is _UNKNOWN else
                         ",".join(v) if isinstance(v, list) else
                         "all" if v is None and k == "limit" else str(v))
        md.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return md


def _problem_counts(runs: Sequence[RunData], bench: str) -> str:
    """Problems evaluated per run for one benchmark: "30", or "30 / 3" when they differ."""
    counts = [(r.summary or {}).get("benchmarks", {}).get(bench, {}).get("num_problems")
              for r in runs if r.summary is not None]
    shown = [str(c) if c is not None else "–" for c in counts]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown) + " ⚠"


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.2f}" if pct else f"{x:.3g}"


def _benchmarks(runs: Sequence[RunData]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for b in (r.summary or {}).get("benchmarks", {}):
            if b not in names:
                names.append(b)
    order = {b: i for i, b in enumerate(MATH_SIX)}
    return sorted(names, key=lambda b: (order.get(b, len(order)), names.index(b)))


def _plot_pass_at_k(runs: Sequence[RunData], bench: str, out: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for r in runs:
        s = (r.summary or {}).get("benchmarks", {}).get(bench)
        if not s or not s.get("pass_at_k"):
            continue
        ks = sorted(int(k) for k in s["pass_at_k"])
        ax.plot(ks, [100 * s["pass_at_k"][str(k)] for k in ks], marker="o", label=r.label)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(bench)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def _diversity_table(runs: Sequence[RunData]) -> dict[str, dict[str, dict[str, float]]]:
    """bench → run label → mean diversity metrics."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        for b, d in ((r.summary or {}).get("diversity") or {}).items():
            table.setdefault(b, {})[r.label] = d.get("mean", d)
    return table


def _plot_diversity(runs: Sequence[RunData], table: Mapping[str, Mapping[str, Mapping[str, float]]],
                    out: Path) -> bool:
    import matplotlib.pyplot as plt
    import numpy as np

    if not table:
        return False
    benches = list(table)
    fig, axes = plt.subplots(1, len(DIVERSITY_BARS), figsize=(3.2 * len(DIVERSITY_BARS), 3.4),
                             squeeze=False)
    labels = [r.label for r in runs]
    width = 0.8 / max(1, len(labels))
    for ax, metric in zip(axes[0], DIVERSITY_BARS):
        x = np.arange(len(benches))
        for i, lab in enumerate(labels):
            vals = [table[b].get(lab, {}).get(metric, np.nan) for b in benches]
            ax.bar(x + i * width, vals, width, label=lab)
        ax.set_xticks(x + width * (len(labels) - 1) / 2)
        ax.set_xticklabels(benches, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _curve(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> tuple[str, list, list] | None:
    for key in keys:
        pts = [(row.get("step", i), row[key]) for i, row in enumerate(rows)
               if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if pts:
            return key, [p[0] for p in pts], [p[1] for p in pts]
    return None


def _val_keys(runs: Sequence[RunData]) -> list[str]:
    """Periodic-validation accuracy keys (``val/<set>/accuracy``) found in any run."""
    keys = {k for r in runs for row in r.metrics for k in row
            if k.startswith("val/") and k.endswith("/accuracy")}
    return sorted(keys)


def _plot_training(runs: Sequence[RunData], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    val = _val_keys(runs)
    panels = list(CURVES.items()) + ([("validation accuracy", tuple(val))] if val else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    used: list[str] = []
    for ax, (title, keys) in zip(axes[0], panels):
        is_val = title == "validation accuracy"
        for r in runs:
            for key in keys:  # validation: one line per set; else the first key present
                c = _curve(r.metrics, (key,))
                if not c:
                    continue
                label = f"{r.label} {key[len('val/'):-len('/accuracy')]}" if is_val else r.label
                ax.plot(c[1], c[2], label=label, marker="." if len(c[1]) < 30 else None)
                used.append(f"{r.label}: {title} ← `{c[0]}`")
                if not is_val:
                    break
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if used:
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    plt.close(fig)
    return used


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path,
                 labels: Sequence[str] | None = None, allow_mixed: bool = False) -> Path:
    """Write report.md and PNG plots comparing the runs into out_dir; returns report.md's path.
    Evaluations with unlike settings (COMPARED) raise ValueError unless `allow_mixed`."""
    import matplotlib

    matplotlib.use("Agg")
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    seen: dict[str, int] = {}
    for r in runs:  # distinct labels even for runs/a/eval and runs/b/eval
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label}#{seen[r.label]}"
        else:
            seen[r.label] = 1
    mixed = mixed_settings(runs)
    if mixed and not allow_mixed:
        what = "; ".join(f"{k}: " + ", ".join(f"{lab}={v}" for lab, v in per.items())
                         for k, per in mixed.items())
        raise ValueError(f"the evaluations were made with different settings ({what}); "
                         f"their scores are not comparable (--allow-mixed to report them anyway, "
                         f"marked)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Run comparison", "", "| run | path | eval dir |", "|---|---|---|"]
    md += [f"| {r.label} | `{r.path}` | `{r.eval_dir}` |" for r in runs]
    if mixed:
        md += ["", "> ⚠ **Mixed evaluation settings** (--allow-mixed): "
               + "; ".join(f"`{k}` differs" for k in mixed)
               + ". Scores in the same row are not directly comparable."]
    if any(r.summary is not None for r in runs):
        md += _settings_table(runs, mixed)

    benches = _benchmarks(runs)
    if benches:
        md += ["", "## Avg@n (%)", "", "| benchmark | " + " | ".join(r.label for r in runs)
               + " | problems |", "|---|" + "---|" * (len(runs) + 1)]
        for b in benches:
            cells = [_fmt((r.summary or {}).get("benchmarks", {}).get(b, {}).get("avg_at_n"))
                     for r in runs]
            md.append(f"| {b} | " + " | ".join(cells) + f" | {_problem_counts(runs, b)} |")
        avgs = []
        for r in runs:
            a = math_average((r.summary or {}).get("benchmarks", {}))
            avgs.append(_fmt(a["value"]) if a["value"] is not None else
                        (_fmt(a["partial_value"]) + " (partial)" if a["benchmarks"] else "–"))
        md.append("| **math average (6)** | " + " | ".join(avgs) + " | |")
        md += ["", "## pass@k (%)", ""]
        for b in benches:
            ks = sorted({int(k) for r in runs for k in
                         (r.summary or {}).get("benchmarks", {}).get(b, {}).get("pass_at_k", {})
                         if int(k) in PASS_KS})
            md += [f"**{b}**", "", "| run | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                   "|---|" + "---|" * len(ks)]
            for r in runs:
                pk = (r.summary or {}).get("benchmarks", {}).get(b, {}).get("pass_at_k", {})
                md.append(f"| {r.label} | " + " | ".join(_fmt(pk.get(str(k))) for k in ks) + " |")
            png = out / f"pass_at_k_{b}.png"
            if _plot_pass_at_k(runs, b, png):
                md += ["", f"![pass@k {b}]({png.name})"]
            md.append("")
    else:
        md += ["", "_No evaluation results found in any run._"]

    table = _diversity_table(runs)
    if table:
        md += ["## Diversity (judge-free, mean per problem)", ""]
        for b, per_run in table.items():
            md += [f"**{b}**", "", "| run | " + " | ".join(DIVERSITY_BARS) + " |",
                   "|---|" + "---|" * len(DIVERSITY_BARS)]
            for lab, d in per_run.items():
                md.append(f"| {lab} | " + " | ".join(_fmt(d.get(m), pct=False)
                                                      for m in DIVERSITY_BARS) + " |")
            md.append("")
        if _plot_diversity(runs, table, out / "diversity.png"):
            md += ["![diversity](diversity.png)", ""]
    judged = [(r.label, (r.summary or {}).get("judge", {})) for r in runs]
    judged = [(lab, j) for lab, j in judged if j.get("enabled")]
    if judged:
        md += ["## LLM-judge diversity (1–5)", "", "| run | mean score | scored | failed |",
               "|---|---|---|---|"]
        md += [f"| {lab} | {_fmt(j.get('mean_score'), pct=False)} | {j.get('num_scored')} | "
               f"{j.get('num_failed')} |" for lab, j in judged]
        md.append("")

    cf_runs = [(r.label, (r.summary or {}).get("codeforces")) for r in runs]
    cf_runs = [(lab, cf) for lab, cf in cf_runs if cf]
    if cf_runs:
        md += ["## Codeforces", "", "| run | solved (first of n) | rating proxy | CodeElo |",
               "|---|---|---|---|"]
        for lab, cf in cf_runs:
            proxy = cf.get("rating_proxy")
            elo = cf.get("codeelo_rating")
            md.append(f"| {lab} | {cf.get('solved_first_of_n')} / {cf.get('num_problems')} | "
                      f"{'–' if proxy is None else f'{proxy:.0f}'} | "
                      f"{'not computed' if elo is None else f'{elo:.0f}'} |")
        md += ["", f"> {cf_runs[0][1].get('note', '')}", ""]

    used = _plot_training(runs, out / "training_curves.png")
    md += ["## Training curves", ""]
    if used:
        md += ["![training curves](training_curves.png)", ""] + [f"- {u}" for u in used] + [""]
    else:
        md += ["_No training metrics found (metrics.jsonl missing or without reward/length/KL "
               "keys)._", ""]
    notes = [n for r in runs for n in r.notes]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
