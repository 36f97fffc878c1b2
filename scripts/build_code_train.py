#!/usr/bin/env python3
"""Build the `code_train` set from the shipped Codeforces problems and refresh SHA256SUMS.

    python scripts/build_code_train.py [--data-dir flowrl_jax/assets/data] [--check]

The split (why: see the provenance README, "Code training set"): the problems of the
Codeforces contests numbered below 2000 (1971-1999, May-Aug 2024) become the training set;
the newer contests (2000-2036) stay held out for evaluation as `codeforces_heldout`.
LiveCodeBench and HumanEval(+) are never used. The output is deterministic (same input bytes →
same file bytes); `--check` rebuilds in memory and fails if the shipped file differs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowrl_jax.data.manifest import write_sums  # noqa: E402
from flowrl_jax.data.registry import (CODE_TRAIN_CODEFORCES_ROWS,  # noqa: E402
                                      CODE_TRAIN_FIRST_HELDOUT_CONTEST, PACKAGED_DATA_DIR)

OUT_REL = Path("code_train") / "code_train.jsonl"


def _normalized(text: str) -> str:
    return " ".join(text.split())


def build_rows(root: Path) -> list[dict]:
    """The code_train rows: Codeforces problems of contests before the held-out ones."""
    problems = json.loads((root / "codeforces" / "codeforces.json").read_text())
    ids = json.loads((root / "codeforces" / "metadata_cf.json").read_text())
    if len(ids) != len(problems):
        raise SystemExit(f"metadata_cf.json has {len(ids)} ids for {len(problems)} problems")
    rows = []
    for i, (cf_id, prob) in enumerate(zip(ids, problems)):
        contest = int(re.match(r"\d+", cf_id).group())
        if contest >= CODE_TRAIN_FIRST_HELDOUT_CONTEST:
            continue
        tests = [{"input": t["input"], "output": t["output"], "testtype": "stdin"}
                 for t in prob["tests"]]
        rows.append({"id": cf_id, "contest": contest, "source_index": i,
                     "problem": prob["problem"], "tests": tests})
    if [r["source_index"] for r in rows] != list(range(CODE_TRAIN_CODEFORCES_ROWS)):
        raise SystemExit("the training contests are no longer the first "
                         f"{CODE_TRAIN_CODEFORCES_ROWS} rows of codeforces.json: update the "
                         "constants in flowrl_jax/data/registry.py")
    _check_disjoint(root, rows, problems[CODE_TRAIN_CODEFORCES_ROWS:])
    return rows


def _check_disjoint(root: Path, rows: list[dict], heldout: list[dict]) -> None:
    """No training statement may equal an evaluation statement (held-out CF, LiveCodeBench)."""
    lcb = json.loads((root / "livecodebench" / "livecodebench.json").read_text())
    evaluated = {_normalized(p["problem"]) for p in [*heldout, *lcb]}
    clash = [r["id"] for r in rows if _normalized(r["problem"]) in evaluated]
    if clash:
        raise SystemExit(f"training problems also in an evaluation set: {clash}")


def render(rows: list[dict]) -> bytes:
    """The jsonl bytes (sorted keys, UTF-8, one row per line)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                   for r in rows).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=PACKAGED_DATA_DIR)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and fail if the shipped file differs")
    args = ap.parse_args(argv)
    root = args.data_dir
    data = render(build_rows(root))
    out = root / OUT_REL
    if args.check:
        same = out.is_file() and out.read_bytes() == data
        print(f"{out}: {'up to date' if same else 'DIFFERS from a rebuild'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    shutil.copyfile(root / "codeforces" / "LICENSE", out.parent / "LICENSE")
    sums = write_sums(root)
    n = data.count(b"\n")
    print(f"wrote {out} ({n} problems, {len(data):,} bytes); refreshed {sums}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
