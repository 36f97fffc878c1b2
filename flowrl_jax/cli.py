"""`flowrl-jax` command line: one sub-command per module in flowrl_jax/commands/."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from flowrl_jax import cpu_runtime
from flowrl_jax.errors import FlowRLError
from flowrl_jax.commands import (bench, check, convert, data, demo, experiment, report, sample,
                                 serve, train)
from flowrl_jax.commands import eval as eval_cmd

# name → (module under flowrl_jax.commands, one-line help). Modules expose
# `add_arguments(parser)` and `run(args) -> int`; they import JAX only inside `run`, so that
# `flowrl-jax --help` and light commands do not pay for it.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "train": (train, "run RL post-training (FlowRL, GRPO, PPO, REINFORCE++) from a YAML config"),
    "demo": (demo, "the CPU demo: FlowRL vs GRPO distribution matching on a tiny Qwen2"),
    "eval": (eval_cmd, "evaluate a model on the math/code benchmarks (Avg@n, pass@k, diversity)"),
    "sample": (sample, "generate text from a model (HF directory or Orbax checkpoint)"),
    "serve": (serve, "serve a model through JetStream's gRPC server"),
    "convert": (convert, "convert checkpoints: hf-to-orbax, orbax-to-hf"),
    "bench": (bench, "throughput benchmarks side by side with HF PyTorch"),
    "report": (report, "compare runs side by side (Markdown + PNG plots)"),
    "data": (data, "the shipped data sets: list, show one record, verify checksums"),
    "experiment": (experiment, "research experiments on the real trainer (countdown: FlowRL vs "
                               "baselines and ablations, held-out pass@k and diversity)"),
    "check": (check, "compile one RL step ahead of time for a TPU slice: HBM per chip, fit, FLOPs"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="flowrl-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowrl-jax` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FlowRLError as e:  # bad input: the message names the culprit, no traceback
        print(f"flowrl-jax {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a handler of its own (train has one)
        print(f"\nflowrl-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The console script: process-wide runtime settings first (the platform when libtpu is
    installed without TPU chips, and CPU settings, before JAX creates its CPU client; see
    cpu_runtime.py), then `main`. In-process callers of `main` (tests,
    notebooks) keep their own settings."""
    cpu_runtime.select_platform()
    cpu_runtime.configure()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
