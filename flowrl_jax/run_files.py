"""Reading what a run directory holds: `metrics.jsonl`, one JSON object per rollout step
(written by `rl.metrics_log.MetricsLogger`, read by `eval.report` and the tests). Kept out of
rl/ so that evaluation and reports read runs without importing the training loop.

Metric names are `group/name` in lower_snake (a data source or set name may sit between:
`reward/gsm8k/accuracy`, `val/aime24/accuracy`); `step` is the one bare key. Runs written
before that convention are read through `METRIC_ALIASES`, the one table of old names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional


#: metrics.jsonl keys of older runs → today's names
METRIC_ALIASES = {
    "accuracy": "reward/accuracy", "entropy": "entropy/rollout", "loss": "loss/total",
    "pg_loss": "loss/policy", "vf_loss": "loss/value", "kl_loss": "loss/kl",
    "kl_penalty": "kl/penalty", "delta_mean": "flowrl/delta_mean", "delta_std": "flowrl/delta_std",
    "log_z_mean": "flowrl/log_z_mean", "w_mean": "flowrl/w_mean", "log_w_mean": "flowrl/log_w_mean",
    "clip_frac": "flowrl/clip_frac", "rhat_mean": "flowrl/rhat_mean",
    "pg_clip_frac": "policy/clip_frac", "pg_clip_frac_lower": "policy/clip_frac_lower",
    "ratio_mean": "policy/ratio_mean", "adv_mean": "policy/adv_mean",
    "vf_clip_frac": "value/clip_frac", "value_mean": "value/mean",
}
#: old key patterns with a name inside (a data source, a model role)
_ALIAS_PATTERNS = ((re.compile(r"accuracy/(.+)"), r"reward/\1/accuracy"),
                   (re.compile(r"grad_norm_([a-z_]+)"), r"optimizer/grad_norm_\1"))


def canonical_key(key: str) -> str:
    """Today's name of a metrics.jsonl key (old names renamed, others unchanged)."""
    if key in METRIC_ALIASES:
        return METRIC_ALIASES[key]
    for pattern, new in _ALIAS_PATTERNS:
        if pattern.fullmatch(key):
            return pattern.sub(new, key)
    return key


def canonical_metrics(record: dict) -> dict:
    """`record` with old metric names renamed (a key already under its new name wins)."""
    out = {}
    for key, value in record.items():
        new = canonical_key(key)
        if new == key or new not in record:
            out[new] = value
    return out


def read_metrics(path: str | os.PathLike, notes: Optional[list[str]] = None) -> list[dict]:
    """The records of a `metrics.jsonl` file (the file or its run directory), old metric
    names read as today's (`canonical_metrics`).

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
                rows.append(canonical_metrics(obj))
            elif notes is not None:
                notes.append(f"{p}:{ln}: skipped non-object line")
    return rows
