"""`flowrl-jax bench NAME [--json]`: throughput side by side with a reference, table + JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from types import ModuleType

from flowrl_jax.bench import attention, convert, rewards, rollout, rollout_memory, sample, train

# name → module exposing `add_arguments(parser)` (optional) and `run(args) -> list[dict]`
MODULES: dict[str, ModuleType] = {"convert": convert, "train": train, "sample": sample,
                                  "rollout": rollout, "rewards": rewards, "attention": attention,
                                  "rollout-memory": rollout_memory}
BENCHES = tuple(MODULES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES + ("all",):
        p = sub.add_parser(name, help=f"run the {name} benchmark" if name != "all" else "run all")
        p.add_argument("--json", action="store_true", help="one JSON object per case and line")
        p.add_argument("--out", default=None, help="also write the rows to this JSONL file")
        if name != "all" and hasattr(MODULES[name], "add_arguments"):
            MODULES[name].add_arguments(p)


def _table(rows: list[dict]) -> str:
    from rich.console import Console
    from rich.table import Table

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    t = Table(title="flowrl-jax bench")
    for k in keys:
        t.add_column(k)
    for r in rows:
        t.add_row(*[(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))) for k in keys])
    console = Console(file=sys.stderr, width=200)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


def run(args: argparse.Namespace) -> int:
    if not args.bench:
        print("flowrl-jax bench: name a benchmark: " + ", ".join(BENCHES + ("all",)), file=sys.stderr)
        return 2
    names = BENCHES if args.bench == "all" else (args.bench,)
    rows: list[dict] = []
    for name in names:
        mod = MODULES[name]
        if args.bench == "all":  # sub-bench defaults
            sub = argparse.ArgumentParser()
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(sub)
            bench_args = sub.parse_args([])
            bench_args.json = args.json
        else:
            bench_args = args
        for row in mod.run(bench_args):
            row = {"bench": name, **row, "machine": platform.machine(), "python": platform.python_version()}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if not args.json:
        print(_table(rows))
    return 0
