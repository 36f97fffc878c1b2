"""`flowrl-jax bench rollout`: full rollout steps of the demo config with their time split.

There is no external reference for a whole RL step; `reference` is the sampling-only rate
(response tokens/s of the sampler alone within the same steps), so `ratio` is the fraction of
the sampler's speed the whole step keeps (1.0 = training adds no overhead over sampling).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="config to time (default: demo)")
    parser.add_argument("--steps", type=int, default=6, help="rollout steps (the first is warm-up)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> list[dict]:
    from flowrl_jax.config import load_config, replace
    from flowrl_jax.rl.trainer import Trainer

    cfg = load_config(getattr(args, "config", "demo"), list(getattr(args, "overrides", []) or []))
    steps = max(2, int(getattr(args, "steps", 6)))
    cfg = replace(cfg, trainer=replace(cfg.trainer, steps=steps, checkpoint_every=10 ** 9,
                                       export_hf=False))
    with tempfile.TemporaryDirectory() as out:
        result = Trainer(cfg, out, console=False).run()
    hist = result.history[1:]  # step 1 includes compilation
    split = {k: float(np.mean([h[f"time/{k}"] for h in hist]))
             for k in ("sampling", "reward", "logprobs", "update")}
    step_s = float(np.mean([h["time/step"] for h in hist]))
    resp = float(np.mean([h["throughput/response_tokens"] for h in hist]))
    return [{"case": f"{getattr(args, 'config', 'demo')} rollout step", "steps_timed": len(hist),
             "ours": resp / step_s, "reference": resp / max(split["sampling"], 1e-9),
             "unit": "response tokens/s (whole step vs sampling alone)",
             "ratio": split["sampling"] / step_s, "step_s": step_s,
             **{f"{k}_s": v for k, v in split.items()},
             **{f"{k}_frac": v / step_s for k, v in split.items()}}]
