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


def check_config(out: Path, cfg: dict[str, Any]) -> None:
    """Write eval_config.json, or refuse a resume whose sample-changing settings differ."""
    path = out / "eval_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        if diff:
            raise EvalError(f"{path}: settings differ from this run in {diff} "
                            f"(old {[old.get(k) for k in diff]}, new {[cfg.get(k) for k in diff]}); "
                            f"use another --out")
    else:
        path.write_text(json.dumps(cfg, indent=1, sort_keys=True))


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """Seed of one chunk: independent of which other chunks/benchmarks run (resume-stable)."""
    h = hashlib.sha256(f"{seed}/{benchmark}/{chunk}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
