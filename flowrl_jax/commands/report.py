"""`flowrl-jax report RUN_DIR [RUN_DIR...] [--out DIR]`: compare runs side by side."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the report command's arguments."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (metrics.jsonl, eval/) or eval output directories")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated run labels (default: directory names)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="report evaluations made with different settings (n, temperature, "
                             "top-p/k, max new tokens, --limit, suites) anyway, marked ⚠; "
                             "without it such a comparison is refused")


def run(args: argparse.Namespace) -> int:
    """Build report.md + PNG plots; returns 0, or 2 on bad arguments."""
    from flowrl_jax.eval.report import build_report  # numpy: only when a report is built

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        path = build_report(args.runs, args.out, labels,
                            allow_mixed=getattr(args, "allow_mixed", False))
    except ValueError as e:
        print(f"flowrl-jax report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
