"""`flowrl-jax train --config FILE [--out DIR] [key=value ...]`: RL post-training.

Rerunning the same command with the same `--out` resumes from the newest complete
checkpoint in `OUT/checkpoints` (bit-exactly: data position, RNG, optimizer all restored); a
config that does not fit the saved checkpoints is refused before anything is touched.
SIGTERM or Ctrl-C stops after the current step with a checkpoint (Ctrl-C: exit status 130); a
second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the train options."""
    parser.add_argument("--config", required=True,
                        help="YAML config (a path, or a name in the packaged configs/)")
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/<config name>); reused to resume")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to start when OUT already holds checkpoints (when it only "
                             "holds checkpoints set aside as corrupt: start again from step 0)")
    parser.add_argument("--no-console", action="store_true",
                        help="no live progress display (logs and metrics.jsonl only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. trainer.steps=10 algo.name=grpo")


def run(args: argparse.Namespace) -> int:
    """Entry point: init multi-process JAX if needed, load the config, train."""
    from flowrl_jax.distributed import maybe_initialize

    maybe_initialize()  # before anything touches a JAX backend
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):  # per-save chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pathlib import Path

    from flowrl_jax.config import ConfigError, load_config
    from flowrl_jax.rl.trainer import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"flowrl-jax train: config error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path("runs") / Path(args.config).stem)
    try:
        trainer = Trainer(cfg, out, console=not args.no_console,
                          allow_resume=not args.no_resume)
        result = trainer.run()
    except ConfigError as e:
        print(f"flowrl-jax train: config error: {e}", file=sys.stderr)
        return 2
    if result.stopped_by == "SIGINT":
        print(f"flowrl-jax train: interrupted: stopped after step {result.step} with a "
              f"checkpoint in {out}; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0
