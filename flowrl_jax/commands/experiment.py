"""`flowrl-jax experiment countdown --out DIR [--full] [--seeds N]`: the small reasoning
experiment (flowrl_jax/experiments/countdown/)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

COUNTDOWN_HELP = ("FlowRL vs GRPO, REINFORCE++, PPO and FlowRL's ablations on a synthetic "
                  "arithmetic task with many valid answers per problem; held-out Avg@16, "
                  "pass@k, distinct answers, mass against the exact target")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one sub-command per experiment (`experiment countdown ...`)."""
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = sub.add_parser("countdown", help=COUNTDOWN_HELP, description=COUNTDOWN_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--full", action="store_true",
                   help="longer budget, more held-out problems, 5 seeds (the default size "
                        "finishes in ≤ 15 min on 2 CPU cores)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per run (default 3; 5 with --full)")
    p.add_argument("--runs", default=None,
                   help="comma-separated subset of the runs (default: all), e.g. flowrl,grpo")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides on configs/countdown.yaml, e.g. trainer.steps=10")


def run(args: argparse.Namespace) -> int:
    """Run the experiment and print where the outputs are."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "flowrl_jax.rl", "flowrl_jax.checkpoint"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from flowrl_jax.config import ConfigError
    from flowrl_jax.experiments.countdown.runner import ExperimentSettings, run_experiment

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    runs = tuple(r for r in args.runs.split(",") if r) if args.runs else None
    settings = ExperimentSettings(Path(args.out), args.full, args.seeds, runs,
                                  tuple(args.overrides))
    summary = run_experiment(settings)
    print(f"report: {args.out}/report.md  summary: {args.out}/summary.json  "
          f"({summary['meta']['seconds']:.0f} s)")
    return 0
