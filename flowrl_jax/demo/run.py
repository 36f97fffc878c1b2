"""`flowrl-jax demo`: FlowRL vs GRPO on the multimodal demo task, with the real trainer.

Both algorithms start from the same random tiny Qwen2 (written once in HF format) and get the
same budget. Each run is trained in two halves — the second half resumes from the first half's
Orbax checkpoint — and exported to HF at the end; the learned answer distributions are read
back from the exported HF directories, so the demo exercises the whole system.
Outputs in OUT: summary.json, details.json, report.md, distributions.png, and one run dir per
algorithm.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowrl_jax.config import Config, load_config, replace
from flowrl_jax.demo.task import DemoTask, DemoTrainTask, summarize

log = logging.getLogger(__name__)

ALGOS = ("flowrl", "grpo")


def answer_distribution(model: Any, task: DemoTask, temperature: float) -> np.ndarray:
    """π(answer | prompt k) over the whole vocabulary, [K, V] float64, from one forward pass."""
    import jax
    import jax.numpy as jnp

    ids = jnp.asarray([task.prompt_ids(k) for k in range(task.num_prompts)], jnp.int32)
    logits = model(ids).logits[:, -1, :].astype(jnp.float32) / temperature
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)


def _write_initial_model(cfg: Config, out: Path) -> Path:
    """A random initial policy in HF format: both algorithms start from exactly these weights."""
    from flowrl_jax.checkpoint.hf import export_hf
    from flowrl_jax.mesh import make_mesh
    from flowrl_jax.checkpoint.load import model_from_config

    path = out / "initial_hf"
    if not (path / "config.json").exists():
        model, arch, _ = model_from_config(cfg.model, make_mesh(cfg.mesh))
        export_hf(model, arch, path, dtype="float32")
    return path


def _train(cfg: Config, run_dir: Path, console: bool) -> dict:
    """Train one algorithm in two halves (the second resumes from the first's checkpoint)."""
    from flowrl_jax.rl.trainer import Trainer

    steps = cfg.trainer.steps
    half = max(1, steps // 2)
    t0 = time.perf_counter()
    first = replace(cfg, trainer=replace(cfg.trainer, steps=half, checkpoint_every=half,
                                         export_hf=False))
    Trainer(first, run_dir, task=DemoTrainTask(first), console=console).run()
    resumed = Trainer(cfg, run_dir, task=DemoTrainTask(cfg), console=console)
    resumed.setup()
    resumed_from = resumed.start_step
    result = resumed.run()
    return {"seconds": time.perf_counter() - t0, "resumed_from_step": resumed_from,
            "steps": result.step, "final_reward": result.history[-1].get("reward/mean")
            if result.history else None}


def plot(path: Path, task: DemoTask, target: np.ndarray, dists: dict[str, np.ndarray]) -> None:
    """Bars of the answer distribution (averaged over prompts, answers aligned by rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ranked(d: np.ndarray) -> tuple[list[float], float]:
        modes = [float(np.mean([d[k, task.mode_tokens(k)[m]] for k in range(task.num_prompts)]))
                 for m in range(len(task.mode_tokens(0)))]
        return modes, float(1.0 - sum(modes))

    labels = [f"mode {m + 1}\n(r={r})" for m, r in
              enumerate(task.reward_table()[0, task.mode_tokens(0)])] + ["all other\nanswers"]
    series = {"target ∝ π_ref·exp(βr)": target, **dists}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    for i, (name, d) in enumerate(series.items()):
        modes, rest = ranked(d)
        ax.bar(np.arange(len(labels)) + (i - (len(series) - 1) / 2) * width, modes + [rest],
               width, label=name)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("probability (mean over prompts)")
    ax.set_title("Learned answer distribution: FlowRL matches the reward distribution, GRPO collapses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(cfg: Config, summary: dict, runs: dict) -> str:
    """The Markdown report."""
    lines = ["# FlowRL vs GRPO on a multimodal reward (CPU demo)", "",
             f"Tiny Qwen2 ({cfg.model.arch.num_hidden_layers} layers, hidden "
             f"{cfg.model.arch.hidden_size}, vocabulary {cfg.model.arch.vocab_size}); "
             f"{cfg.task.get('num_prompts', 4)} prompts, each with 3 valid answers of reward "
             "1.0 / 0.8 / 0.6; every other answer scores 0. Same initial model, same sampler, "
             f"{cfg.trainer.steps} rollout steps × {cfg.rollout.prompts_per_step} prompts × "
             f"G={cfg.rollout.samples_per_prompt} for both.",
             f"Target: p(y|x) ∝ π_ref(y|x)·exp(β·r), β = {cfg.algo.beta} (FlowRL with "
             f"`algo.reward_norm: {cfg.algo.reward_norm}`).", "",
             "| algorithm | KL(target‖π) | KL(π‖target) | mass per mode (best first) | "
             "target mass per mode | modes covered | train time |",
             "|---|---|---|---|---|---|---|"]
    for algo in summary:
        s = summary[algo]
        fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines.append(f"| {algo} | {s['kl_target_policy']:.3f} | {s['kl_policy_target']:.3f} | "
                     f"{fmt(s['mass_per_mode'])} | {fmt(s['target_mass_per_mode'])} | "
                     f"{s['modes_covered']} / 3 | {runs[algo]['seconds']:.0f} s |")
    lines += ["", "A mode is covered when the policy holds at least half of the target's mass "
              "for it.", "", "![answer distributions](distributions.png)", "",
              "Each run trained its first half, checkpointed, resumed from the checkpoint "
              "(`resumed_from_step` in summary.json) and exported the final policy to HF format "
              "(`<algo>/hf`); the distributions above are computed from the exported HF weights."]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, config: str | Path = "demo", overrides: list[str] | None = None,
             console: bool = True, algos: Sequence[str] = ALGOS) -> dict:
    """Train FlowRL and GRPO (or only `algos`, e.g. for a test) on the demo task and write
    summary.json, report.md and a plot."""
    from flowrl_jax.mesh import make_mesh
    from flowrl_jax.checkpoint.load import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, overrides)
    task = DemoTrainTask(cfg).task
    init_path = _write_initial_model(cfg, out)
    base = replace(cfg, model=replace(cfg.model, path=str(init_path)),
                   trainer=replace(cfg.trainer, export_hf=True))
    mesh = make_mesh(cfg.mesh)
    temperature = cfg.rollout.temperature
    ref_model, _, _ = load_model(init_path, mesh)
    ref = answer_distribution(ref_model, task, temperature)
    target = task.target(np.log(ref), cfg.algo.beta)

    runs, dists, summary = {}, {}, {}
    for algo in algos:
        algo_cfg = replace(base, algo=replace(base.algo, name=algo))
        runs[algo] = _train(algo_cfg, out / algo, console)
        model, _, _ = load_model(out / algo / "hf", mesh)
        dists[algo] = answer_distribution(model, task, temperature)
        summary[algo] = {**summarize(task, dists[algo], target), **runs[algo]}

    # summary.json holds exactly one object per algorithm (tools iterate over it);
    # the reference policy and the settings go to details.json.
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    details = {"reference_policy": summarize(task, ref, target),
               "config": {"beta": cfg.algo.beta, "reward_norm": cfg.algo.reward_norm,
                          "steps": cfg.trainer.steps, "lr": cfg.optimizer.lr,
                          "prompts_per_step": cfg.rollout.prompts_per_step,
                          "samples_per_prompt": cfg.rollout.samples_per_prompt},
               "target": target.tolist(), **{f"policy_{a}": dists[a].tolist() for a in algos}}
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    plot(out / "distributions.png", task, target, dists)
    (out / "report.md").write_text(report_markdown(cfg, summary, runs))
    return summary
