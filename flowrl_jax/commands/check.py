"""`flowrl-jax check --config FILE --topology NAME [--json] [key=value ...]`: compile every
program of one RL step for a TPU slice ahead of time, on any machine (needs libtpu: the
`tpu-aot` extra), and report HBM per chip, whether it fits, FLOPs and the memory estimate.

No weights are read and nothing is allocated: the architecture comes from `model.path`'s
config.json when that exists, else from `model.preset`. Exit code 0 when every program
fits, 1 when one does not (named, with the overflow), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the check options."""
    parser.add_argument("--config", required=True,
                        help="YAML config (a path, or a name in the packaged configs/)")
    parser.add_argument("--topology", required=True, metavar="NAME",
                        help="TPU slice, e.g. v5e-8, v5e-16, v5p-8, v5p-64, v5p-256, v6e-8")
    parser.add_argument("--json", action="store_true", help="one JSON object per program and line")
    parser.add_argument("--programs", default=None, metavar="NAME,...",
                        help="compile only these programs (default: all of train_step, "
                             "logprobs_old, logprobs_ref, sampler_prefill, sampler_insert, "
                             "sampler_admit, sampler_decode)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.path=null model.preset=qwen2.5-7b")


def run(args: argparse.Namespace) -> int:
    """Compile, print the rows and the verdict; 0 fits, 1 does not, 2 bad input."""
    from flowrl_jax import cpu_runtime

    cpu_runtime.quiet_tpu_compiler_environment()  # before libtpu is loaded
    from flowrl_jax.aot.programs import PROGRAMS
    from flowrl_jax.aot.topologies import get_slice
    from flowrl_jax.config import ConfigError, load_config

    sl = get_slice(args.topology)
    only = None
    if args.programs:
        only = {p.strip() for p in args.programs.split(",") if p.strip()}
        unknown = sorted(only - set(PROGRAMS))
        if unknown:
            raise ConfigError(f"--programs: unknown {', '.join(unknown)} (known: "
                              f"{', '.join(PROGRAMS)})")
    cfg = load_config(args.config, args.overrides)
    return check(cfg, sl, only=only, as_json=args.json)


def check(cfg: Any, sl: Any, *, only: Optional[set[str]] = None, as_json: bool = False,
          capacity_bytes: Optional[int] = None) -> int:
    """Compile and report `cfg`'s programs for slice `sl`; the exit code (0 fits, 1 not).
    `capacity_bytes` replaces the chip's HBM (tests)."""
    from flowrl_jax.aot.report import check_arch, run_check, summary

    rows = run_check(cfg, check_arch(cfg), sl, only=only, as_json=as_json,
                     capacity_bytes=capacity_bytes)
    print(summary(rows), file=sys.stderr if as_json else sys.stdout, flush=True)
    return 0 if all(r.fits for r in rows) else 1
