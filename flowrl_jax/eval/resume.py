"""The files that make an evaluation resumable: the appended samples and the settings that
produced them, plus the per-chunk seeds that make a resumed run reproduce an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flowrl_jax.eval.records import EvalError


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Finished samples; a torn last line (killed writer) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:  # drop the partial record so appends start clean
            f.truncate(cut)
        raw = raw[:cut]
    out = []
    for ln, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{ln}: corrupt sample line ({e.msg}); delete it to resume")
        missing = [k for k in ("benchmark", "prompt_id", "sample_index", "score") if k not in rec]
        if missing:
            raise EvalError(f"{path}:{ln}: sample record lacks {missing}")
        out.append(rec)
    return out


# Recorded in eval_config.json for readers (report) but free to change on resume: samples are
# keyed per (benchmark, prompt_id, sample_index), so another suite or --limit only adds rows.
RECORDED_ONLY = ("benchmarks", "limit", "model_identity")
# What `eval` writes into --out; --overwrite removes exactly these (plus <benchmark>.md).
OUTPUT_FILES = ("samples.jsonl", "eval_config.json", "summary.json", "results.md")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)  # never a half-written eval_config.json


def check_config(out: Path, cfg: dict[str, Any]) -> None:
    """Write eval_config.json, or refuse a resume whose model or sample-changing settings
    differ (the recorded-only keys are updated to this run's)."""
    path = out / "eval_config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: unreadable ({e}); use --overwrite or another --out") from e
        if "model_digest" in cfg and "model_digest" not in old:
            raise EvalError(f"{path}: written before evals recorded the model's digest, so the "
                            f"samples there cannot be matched to this model; use --overwrite "
                            f"or another --out")
        diff = sorted(k for k in set(old) | set(cfg)
                      if k not in RECORDED_ONLY and old.get(k) != cfg.get(k))
        if diff:
            what = ("the model changed since these samples were made (another checkpoint step "
                    "or re-exported weights); " if "model_digest" in diff else "")
            raise EvalError(f"{path}: {what}settings differ from this run in {diff} "
                            f"(old {[old.get(k) for k in diff]}, new {[cfg.get(k) for k in diff]}); "
                            f"use --overwrite to start afresh, or another --out")
        if any(old.get(k) != cfg.get(k) for k in RECORDED_ONLY if k in cfg):
            _write_json(path, {**old, **{k: cfg[k] for k in RECORDED_ONLY if k in cfg}})
    else:
        _write_json(path, cfg)


def clear_outputs(out: Path, benchmarks: Any = ()) -> list[str]:
    """--overwrite: remove the files an earlier eval wrote into `out`; returns their names."""
    names = list(OUTPUT_FILES) + [f"{b}.md" for b in benchmarks]
    gone = []
    for name in names:
        p = out / name
        if p.is_file():
            p.unlink()
            gone.append(name)
    return gone


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """Seed of one chunk: independent of which other chunks/benchmarks run (resume-stable)."""
    h = hashlib.sha256(f"{seed}/{benchmark}/{chunk}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
