"""`flowrl-jax data list | show NAME [--index I] | verify [--data-dir DIR]`: the shipped data sets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TEXT_LIMIT = 4000  # characters of one test input/output or test program shown by `show`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `data list`, `data show` and `data verify`."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("list", help="the registered data sets: name, kind, rows, license, path")
    p.add_argument("--data-dir", default=None, help="data root (default: $FLOWRL_DATA_DIR, "
                                                     "else the copy shipped in the package)")
    p = sub.add_parser("show", help="one record rendered through its prompt template, with "
                                    "its gold answer or tests")
    p.add_argument("name", help="registered data set name (see `flowrl-jax data list`)")
    p.add_argument("--index", type=int, default=0, help="record index (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="also wrap the prompt in the packaged Qwen2.5 chat template")
    p.add_argument("--data-dir", default=None, help="data root (default as for `list`)")
    p = sub.add_parser("verify", help="check checksums and row counts; names each changed or "
                                      "missing file (exit 1 then)")
    p.add_argument("--data-dir", default=None, help="data root to check (default as for `list`)")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the sub-command; 0 on success, 1 when verify finds a problem, 2 on bad input."""
    from flowrl_jax.data.records import DataError

    try:
        return {"list": _list, "show": _show, "verify": _verify}[args.data_command](args)
    except DataError as e:
        print(f"flowrl-jax data {args.data_command}: {e}", file=sys.stderr)
        return 2


def _list(args: argparse.Namespace) -> int:
    from flowrl_jax.data.registry import REGISTRY, resolve_data_dir
    from flowrl_jax.data.verify import license_name

    root = resolve_data_dir(args.data_dir)
    rows = [("name", "kind", "rows", "license", "path")]
    for name, info in REGISTRY.items():
        rows.append((name, info.kind, str(info.num_rows - len(info.drop_ids)),
                     license_name((root / info.path).parent), str(root / info.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"\ndata root: {root} (provenance: {root / 'README.md'})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from flowrl_jax.data.records import DataError
    from flowrl_jax.data.registry import REGISTRY, load_dataset
    from flowrl_jax.data.templates import apply_template

    if args.name not in REGISTRY:
        raise DataError(f"unknown data set {args.name!r} (known: {', '.join(REGISTRY)})")
    if args.index < 0:
        raise DataError(f"--index must be >= 0, got {args.index}")
    records = load_dataset(args.name, args.data_dir, limit=args.index + 1).records
    if args.index >= len(records):
        raise DataError(f"--index {args.index} is out of range: {args.name} has "
                        f"{len(records)} records")
    rec = records[args.index]
    prompt = apply_template(rec)
    if args.chat:
        from flowrl_jax.data.templates import ChatRenderer
        from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER, load_tokenizer

        prompt = ChatRenderer(load_tokenizer(PACKAGED_TOKENIZER))(prompt)
    print(f"{args.name}[{args.index}]  id={rec.id}  data_source={rec.data_source}  "
          f"template={rec.template}")
    print("\n--- prompt ---\n" + prompt)
    print("\n--- gold ---\n" + _gold_text(rec.ground_truth))
    if rec.extra:
        print("\n--- extra ---\n" + json.dumps(rec.extra, ensure_ascii=False, default=str))
    return 0


def _clip(text: str) -> str:
    if len(text) <= TEXT_LIMIT:
        return text
    return text[:TEXT_LIMIT] + f"… [{len(text) - TEXT_LIMIT:,} more characters]"


def _gold_text(gt: Any) -> str:
    """The gold answer (math) or the tests (code) as readable text."""
    if isinstance(gt, str):
        return gt
    lines = []
    for i, t in enumerate(gt.get("tests", [])):
        lines.append(f"test {i} ({t.get('testtype', 'stdin')}):")
        lines.append("  input:  " + _clip(str(t["input"])).replace("\n", "\n          "))
        lines.append("  output: " + _clip(str(t["output"])).replace("\n", "\n          "))
    if gt.get("starter_code"):
        lines.append("starter code:\n" + gt["starter_code"])
    if "test" in gt:
        lines.append(f"entry point: {gt.get('entry_point')}\ntest program:\n" + _clip(gt["test"]))
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    from flowrl_jax.data.registry import resolve_data_dir
    from flowrl_jax.data.verify import verify_data_root

    root = resolve_data_dir(args.data_dir)
    report = verify_data_root(Path(root))
    for line in report.problems:
        print(f"FAIL {line}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{root}: {report.files_checked} files checksummed, {report.sets_checked} data sets "
          f"row-counted: {status}")
    return 0 if report.ok else 1
