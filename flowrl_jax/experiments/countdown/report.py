"""report.md and the PNG plots of the Countdown experiment, from the summary dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowrl_jax.experiments.countdown.runs import BETA_SWEEP, UNAVAILABLE

PLOTS = ("pass_at_k.png", "distinct_answers.png", "training_curves.png")


def _ok(runs: dict) -> dict:
    return {n: r for n, r in runs.items() if r["status"] == "ok"}


def _pm(fig: dict, digits: int = 3) -> str:
    return f"{fig['mean']:.{digits}f} ± {fig['std']:.{digits}f}"


def table_rows(summary: dict) -> list[str]:
    """The Markdown results table (mean ± std over seeds; π_ref first)."""
    ref = summary["meta"]["reference"]
    lines = ["| run | Avg@16 | pass@1 | pass@8 | pass@32 | distinct correct / problem | "
             "mass on valid | KL(target‖π) | answers covered | 2-number / 3-number mass | "
             "seen: Avg@16 | seen: distinct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    kmax = str(max(int(k) for k in ref["pass_at_k"]))
    lines.append(f"| π_ref | {ref['accuracy_avg16']:.3f} | {ref['pass_at_k']['1']:.3f} | "
                 f"{ref['pass_at_k'].get('8', float('nan')):.3f} | {ref['pass_at_k'][kmax]:.3f} | "
                 f"{ref['distinct_correct_per_problem']:.2f} | {ref['mass_on_valid']:.3f} | "
                 f"{ref['kl_target_policy']:.3f} | {ref['answers_covered']:.2f} | "
                 f"{ref['mass_by_length'][0]:.2f} / {ref['mass_by_length'][1]:.2f} | "
                 f"{ref['seen']['accuracy_avg16']:.3f} | "
                 f"{ref['seen']['distinct_correct_per_problem']:.2f} |")
    for name, r in summary["runs"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {UNAVAILABLE} (`{' '.join(r['overrides'][1:])}`) "
                         "| | | | | | | | | | |")
            continue
        pk = r["pass_at_k"]
        ml = r["mass_by_length"]["mean"]
        lines.append(f"| {name} | {_pm(r['accuracy_avg16'])} | {_pm(pk['1'])} | "
                     f"{_pm(pk.get('8', pk['1']))} | {_pm(pk[kmax])} | "
                     f"{_pm(r['distinct_correct_per_problem'], 2)} | {_pm(r['mass_on_valid'])} | "
                     f"{_pm(r['kl_target_policy'])} | {_pm(r['answers_covered'], 2)} | "
                     f"{ml[0]:.2f} / {ml[1]:.2f} | {_pm(r['seen']['accuracy_avg16'])} | "
                     f"{_pm(r['seen']['distinct_correct_per_problem'], 2)} |")
    return lines


def claims(summary: dict) -> list[str]:
    """The paper's claimed directions, checked against this run's means (seed spread given)."""
    runs = _ok(summary["runs"])
    out = []

    def mean(name: str, key: str) -> float | None:
        return runs[name][key]["mean"] if name in runs else None

    if "flowrl" in runs and "grpo" in runs:
        for key, label in (("accuracy_avg16", "accuracy (Avg@16)"),
                           ("distinct_correct_per_problem", "distinct correct answers")):
            f, g = mean("flowrl", key), mean("grpo", key)
            out.append(f"- FlowRL ≥ GRPO on {label}: {'yes' if f >= g else 'no'} "
                       f"({f:.3f} vs {g:.3f}; std {runs['flowrl'][key]['std']:.3f} / "
                       f"{runs['grpo'][key]['std']:.3f})")
    if "flowrl_is_one" in summary["runs"]:
        if "flowrl_is_one" in runs and "flowrl" in runs:
            f, a = mean("flowrl", "accuracy_avg16"), mean("flowrl_is_one", "accuracy_avg16")
            out.append(f"- removing importance sampling (w ≡ 1) hurts accuracy: "
                       f"{'yes' if a < f else 'no'} ({a:.3f} vs {f:.3f})")
        else:
            out.append(f"- removing importance sampling (w ≡ 1) hurts: {UNAVAILABLE}")
    betas = {b: mean(n, "accuracy_avg16") for b, n in BETA_SWEEP.items() if n in runs}
    if len(betas) == len(BETA_SWEEP):
        best = max(betas, key=lambda b: betas[b])
        out.append(f"- β = 15 best of the sweep {{5, 15, 30}} on accuracy: "
                   f"{'yes' if best == 15.0 else f'no (β = {best:g} is)'} ("
                   + ", ".join(f"β={b:g}: {v:.3f}" for b, v in betas.items()) + ")")
    return out


def markdown(summary: dict) -> str:
    """The report."""
    meta = summary["meta"]
    fit = meta["reference_fit"]
    lines = [
        "# Countdown: FlowRL vs GRPO, REINFORCE++, PPO and FlowRL's ablations", "",
        "Reach a target (1…99) by combining 2 or 3 of three distinct numbers (1…9) with + − × "
        "(× first), each number at most once; every valid answer is enumerated, so the target "
        "p(y|x) ∝ π_ref(y|x)·exp(β r) is exact. A tiny Qwen2 is fitted by "
        f"{fit['steps']} supervised steps to a broad, imperfect answer distribution (π_ref), "
        f"then every run trains from it through the real trainer for {meta['steps']} rollout "
        f"steps × {meta['prompts_per_step']} prompts × G = {meta['samples_per_prompt']} over "
        f"{meta['seeds']} seeds (β = {meta['beta']:g} unless the run says otherwise).",
        f"Held-out: {meta['num_heldout_problems']} problems on number sets never trained on "
        f"({meta['num_train_problems']} training problems), "
        f"{meta['eval_samples_per_problem']} samples each at temperature 1.", "",
        "Figures are mean ± std over seeds; per-seed values are in summary.json. *Mass on "
        "valid*, *KL(target‖π)* (over the valid answers plus one 'everything else' outcome), "
        "*answers covered* (share of valid answers holding ≥ half their target mass) and the "
        "mass on 2-number vs 3-number answers are exact (every valid answer scored by the "
        "final checkpoint), not sampled. *seen*: the same figures on as many training "
        "problems.", "",
        *table_rows(summary), "",
        "## The paper's claimed directions", "", *claims(summary), "",
        "![pass@k](pass_at_k.png)", "", "![distinct answers](distinct_answers.png)", "",
        "![training curves](training_curves.png)", "",
        f"Total wall time: {meta['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_all(out: Path, summary: dict) -> None:
    """pass@k curves (seed spread), distinct-answer bars, training reward curves."""
    import matplotlib  # heavy optional dependency: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _ok(summary["runs"])
    ref = summary["meta"]["reference"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = sorted(int(k) for k in ref["pass_at_k"])
    ax.plot(ks, [ref["pass_at_k"][str(k)] for k in ks], "k--", label="π_ref")
    for name, r in runs.items():
        vals = np.asarray([r["pass_at_k"][str(k)]["per_seed"] for k in ks])  # [K, seeds]
        line, = ax.plot(ks, vals.mean(axis=1), label=name)
        ax.fill_between(ks, vals.min(axis=1), vals.max(axis=1), color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.set_title("pass@k: mean over seeds, band = min…max over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = ["π_ref"] + list(runs)
    means = [ref["distinct_correct_per_problem"]] + [r["distinct_correct_per_problem"]["mean"]
                                                      for r in runs.values()]
    stds = [0.0] + [r["distinct_correct_per_problem"]["std"] for r in runs.values()]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue")
    for i, r in enumerate(runs.values(), start=1):
        ax.scatter([i] * len(r["seeds"]), r["distinct_correct_per_problem"]["per_seed"],
                   color="k", s=8, zorder=3)
    ax.axhline(ref["valid_answers_per_problem"], color="gray", ls=":",
               label="valid answers per problem")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"distinct correct answers in {max(ks)} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distinct_answers.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs.items():
        curves = np.asarray(r["reward_curve"]["per_seed"], np.float64)  # [seeds, steps]
        steps = np.arange(1, curves.shape[1] + 1)
        line, = ax.plot(steps, curves.mean(axis=0), label=name)
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("training reward (accuracy of the rollouts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    """report.md and the plots."""
    plot_all(out, summary)
    (out / "report.md").write_text(markdown(summary))
