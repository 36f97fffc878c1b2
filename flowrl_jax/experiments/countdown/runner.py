"""`flowrl-jax experiment countdown`: fit π_ref, train every run through the real trainer on
the same budget over several seeds, evaluate each final checkpoint on held-out problems.

Outputs in OUT: summary.json (per run: status, overrides, per-seed figures, mean and std),
details.json (per-answer masses against the target), report.md, PNG plots, reference_hf/
(π_ref), runs/<name>/seed<k>/ (each a complete trainer run directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np

from flowrl_jax.checkpoint.hf import export_hf
from flowrl_jax.checkpoint.load import load_model, random_model
from flowrl_jax.config import Config, load_config
from flowrl_jax.errors import ConfigError
from flowrl_jax.experiments.countdown import report
from flowrl_jax.experiments.countdown.evaluate import (answer_logprobs, heldout_metrics,
                                                       sample_answers)
from flowrl_jax.experiments.countdown.runs import UNAVAILABLE, all_runs, unavailable_reason
from flowrl_jax.experiments.countdown.sft import SFTSettings, fit_reference
from flowrl_jax.experiments.countdown.task import Problem
from flowrl_jax.experiments.countdown.train_task import CountdownTrainTask
from flowrl_jax.mesh import make_mesh
from flowrl_jax.models.qwen2 import Numerics
from flowrl_jax.rl.trainer import Trainer
from flowrl_jax.sampling.engine import SamplingEngine

log = logging.getLogger(__name__)

CONFIG = "countdown"
#: `--full`: a longer budget and more held-out problems (same model shape)
FULL_OVERRIDES = ["trainer.steps=120", "trainer.checkpoint_every=120", "task.num_heldout=64",
                  "task.sft_steps=600"]
DEFAULT_SEEDS, FULL_SEEDS = 3, 5
SCALAR_FIGURES = ("accuracy_avg16", "distinct_correct_per_problem", "mass_on_valid",
                  "kl_target_policy", "answers_covered")


@dataclass(frozen=True)
class ExperimentSettings:
    """What one invocation runs."""

    out: Path
    full: bool = False
    seeds: Optional[int] = None
    runs: Optional[tuple[str, ...]] = None  # None → every run in runs.all_runs()
    overrides: tuple[str, ...] = ()

    @property
    def num_seeds(self) -> int:
        return self.seeds or (FULL_SEEDS if self.full else DEFAULT_SEEDS)

    def base_overrides(self) -> list[str]:
        return (FULL_OVERRIDES if self.full else []) + list(self.overrides)


@contextlib.contextmanager
def compile_cache(out: Path) -> Iterator[None]:
    """Every run has the same shapes: later runs load their executables from OUT/.jax_cache
    (a cache the caller configured is kept; the settings are restored afterwards)."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def fit_reference_model(cfg: Config, task: CountdownTrainTask, out: Path, mesh: Any) -> dict:
    """Fit π_ref on the training problems and write it to OUT/reference_hf (kept if present)."""
    path = out / "reference_hf"
    info_path = out / "reference_fit.json"
    if (path / "config.json").exists() and info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    s = SFTSettings(steps=int(cfg.task.get("sft_steps", SFTSettings.steps)), seed=cfg.seed)
    model = random_model(cfg.model.arch, Numerics.from_config(cfg.model), mesh, cfg.seed)
    losses = fit_reference(model, task.train, s)
    export_hf(model, cfg.model.arch, path, dtype="float32")
    info = {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
            "valid_fraction": s.valid_fraction, "short_weight": s.short_weight,
            "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate_model(model: Any, engine: SamplingEngine, problems: list[Problem],
                   ref_logp: list[np.ndarray], beta: float, n: int, seed: int) -> dict:
    """The figures of one policy on `problems`."""
    samples = sample_answers(engine, model, problems, n, seed)
    return heldout_metrics(problems, samples, answer_logprobs(model, problems), ref_logp, beta)


def evaluate_both(model: Any, engine: SamplingEngine, sets: dict[str, list[Problem]],
                  ref_logp: dict[str, list[np.ndarray]], beta: float, n: int, seed: int
                  ) -> tuple[dict, dict]:
    """(held-out figures with the seen-problem figures under "seen", per-answer details)."""
    held = evaluate_model(model, engine, sets["heldout"], ref_logp["heldout"], beta, n, seed)
    seen = evaluate_model(model, engine, sets["seen"], ref_logp["seen"], beta, n, seed)
    per_answer = {"heldout": held.pop("per_answer"), "seen": seen.pop("per_answer")}
    return {**held, "seen": seen}, per_answer


def train_one(cfg: Config, run_dir: Path) -> dict:
    """One trainer run to its final checkpoint (resumed when run_dir holds one)."""
    t0 = time.perf_counter()
    result = Trainer(cfg, run_dir, task=CountdownTrainTask(cfg), console=False).run()
    return {"seconds": time.perf_counter() - t0, "steps": result.step,
            "reward_curve": [h.get("reward/mean") for h in result.history]}


def run_experiment(settings: ExperimentSettings) -> dict:
    """Run the experiment and write summary.json, details.json, report.md and the plots."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    with compile_cache(out):
        return _run(settings, out)


def _run(settings: ExperimentSettings, out: Path) -> dict:
    t_start = time.perf_counter()
    wanted = selected_runs(settings.runs)  # before any compute: a typo fails at once
    base = settings.base_overrides()
    cfg = load_config(CONFIG, base)
    mesh = make_mesh(cfg.mesh)
    task = CountdownTrainTask(cfg)
    ref_info = fit_reference_model(cfg, task, out, mesh)
    ref_model, _, _ = load_model(out / "reference_hf", mesh)
    n_eval = int(cfg.task.get("eval_samples", 32))
    # the trainer's sampler shapes: its compiled kernels serve the evaluation too
    engine = SamplingEngine.from_rollout_config(ref_model, cfg.rollout, mesh=mesh, verbose=False)
    sets = {"heldout": task.heldout, "seen": task.train[:len(task.heldout)]}
    ref_logp = {k: answer_logprobs(ref_model, v) for k, v in sets.items()}
    details: dict[str, Any] = {}
    reference, details["reference"] = evaluate_both(ref_model, engine, sets, ref_logp,
                                                    cfg.algo.beta, n_eval, 0)

    summary: dict[str, Any] = {}
    for name, overrides in wanted.items():
        reason = unavailable_reason(CONFIG, base + overrides)
        if reason is not None:
            log.info("run %s: %s (%s)", name, UNAVAILABLE, reason)
            summary[name] = {"status": UNAVAILABLE, "overrides": overrides, "reason": reason}
            continue
        per_seed = []
        for seed in range(settings.num_seeds):
            run_cfg = load_config(CONFIG, base + overrides + [
                f"seed={seed}", f"model.path={out / 'reference_hf'}"])
            run_dir = out / "runs" / name / f"seed{seed}"
            log.info("run %s seed %d → %s", name, seed, run_dir)
            trained = train_one(run_cfg, run_dir)
            model, _, _ = load_model(run_dir / "checkpoints", mesh)  # the real checkpoint
            m, per_answer = evaluate_both(model, engine, sets, ref_logp, run_cfg.algo.beta,
                                          n_eval, 1000 + seed)
            details.setdefault(name, []).append(per_answer)
            per_seed.append({**m, **trained, "seed": seed})
        summary[name] = aggregate(name, overrides, per_seed)

    meta = {"reference": reference, "reference_fit": ref_info, "full": settings.full,
            "seeds": settings.num_seeds, "config_overrides": base,
            "steps": cfg.trainer.steps, "prompts_per_step": cfg.rollout.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt, "beta": cfg.algo.beta,
            "num_train_problems": len(task.train), "num_heldout_problems": len(task.heldout),
            "eval_samples_per_problem": n_eval, "seconds": time.perf_counter() - t_start}
    (out / "details.json").write_text(json.dumps({"meta": meta, "per_answer": details}) + "\n")
    full_summary = {"runs": summary, "meta": meta}
    report.write_outputs(out, full_summary)
    meta["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(full_summary, indent=2) + "\n")
    return full_summary


def selected_runs(names: Optional[tuple[str, ...]]) -> dict[str, list[str]]:
    """The runs to do: all, or the named ones (an unknown name is a ConfigError)."""
    runs = all_runs()
    if names is None:
        return runs
    unknown = [r for r in names if r not in runs]
    if unknown:
        raise ConfigError(f"--runs: unknown run(s) {unknown} (known: {', '.join(runs)})")
    return {r: runs[r] for r in names}


def aggregate(name: str, overrides: list[str], per_seed: list[dict]) -> dict:
    """One summary.json entry: per-seed values, their mean and standard deviation."""
    entry: dict[str, Any] = {"status": "ok", "overrides": overrides,
                             "seeds": [s["seed"] for s in per_seed]}
    for key in SCALAR_FIGURES + ("seconds",):
        vals = [float(s[key]) for s in per_seed]
        entry[key] = {"per_seed": vals, "mean": float(np.mean(vals)), "std": float(np.std(vals))}
    ks = per_seed[0]["pass_at_k"].keys()
    entry["pass_at_k"] = {k: {"per_seed": [s["pass_at_k"][k] for s in per_seed],
                              "mean": float(np.mean([s["pass_at_k"][k] for s in per_seed])),
                              "std": float(np.std([s["pass_at_k"][k] for s in per_seed]))}
                          for k in ks}
    for key in ("mass_by_length", "target_mass_by_length"):
        entry[key] = {"per_seed": [s[key] for s in per_seed],
                      "mean": np.mean([s[key] for s in per_seed], axis=0).tolist()}
    entry["reward_curve"] = {"per_seed": [s["reward_curve"] for s in per_seed]}
    entry["seen"] = {key: {"per_seed": [s["seen"][key] for s in per_seed],
                           "mean": float(np.mean([s["seen"][key] for s in per_seed])),
                           "std": float(np.std([s["seen"][key] for s in per_seed]))}
                     for key in SCALAR_FIGURES}
    return entry
