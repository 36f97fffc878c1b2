"""Reading what a run directory holds: `metrics.jsonl`, one JSON object per rollout step
(written by `rl.metrics_log.MetricsLogger`, read by `eval.report` and the tests). Kept out of
rl/ so that evaluation and reports read runs without importing the training loop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def read_metrics(path: str | os.PathLike, notes: Optional[list[str]] = None) -> list[dict]:
    """The records of a `metrics.jsonl` file (the file or its run directory).

    A line that is not a JSON object (the torn last line of a killed run, a stray edit) is
    skipped, and named by file and line in `notes` when a list is given.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    rows = []
    with open(p, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if notes is not None:
                    notes.append(f"{p}:{ln}: skipped unparsable line ({e.msg})")
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            elif notes is not None:
                notes.append(f"{p}:{ln}: skipped non-object line")
    return rows
