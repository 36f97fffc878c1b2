"""What an evaluation evaluated: a digest of the model's files, so that a resumed eval never
mixes samples of two different models that happen to live at the same path.

* HF directory: sha256 of ``config.json`` plus, per ``*.safetensors`` file, its size, the
  sha256 of its header (tensor names, dtypes, shapes, offsets) and a content checksum.
* Orbax checkpoint or run directory: the resolved (latest complete) step, sha256 of
  ``model.json`` and the same size + content checksum of every file of that step.

The content checksum is sha256 over the whole file up to 64 MiB; above that, over 256 blocks
of 64 KiB at evenly spaced offsets (always the first and last). A training step changes
essentially every block; the sampling keeps a 145 GB model's check at ~16 MiB read per file
instead of minutes of hashing. An edit of a few bytes between sampled blocks of a large file
would go unnoticed: that is the stated trade-off.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from flowrl_jax.checkpoint import orbax
from flowrl_jax.checkpoint.load import model_kind

FULL_HASH_BYTES = 64 << 20
BLOCK = 64 << 10
BLOCKS = 256


def content_checksum(path: Path) -> str:
    """sha256 of the whole file (≤ 64 MiB) or of 256 evenly spaced 64 KiB blocks."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        step = (size - BLOCK) / (BLOCKS - 1)
        for i in range(BLOCKS):
            f.seek(int(i * step))
            h.update(f.read(BLOCK))
    return f"sampled{BLOCKS}x{BLOCK}:" + h.hexdigest()


def safetensors_header_sha(path: Path) -> str:
    """sha256 of a safetensors file's JSON header (8-byte little-endian length + header)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "truncated"
        (n,) = struct.unpack("<Q", raw)
        return hashlib.sha256(raw + f.read(min(n, 100 << 20))).hexdigest()


def _sha_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _hf_identity(d: Path) -> dict[str, Any]:
    files = []
    for p in sorted(d.glob("*.safetensors")):
        files.append({"file": p.name, "size": p.stat().st_size,
                      "header_sha256": safetensors_header_sha(p),
                      "checksum": content_checksum(p)})
    ident = {"kind": "hf", "config_sha256": _sha_file(d / "config.json"), "weights": files}
    return {**ident, "digest": _digest(ident)}


def _orbax_identity(d: Path) -> dict[str, Any]:
    steps = orbax.all_steps(d)
    step = steps[-1] if steps else None
    files = []
    if step is not None:
        root = d / str(step)
        for p in sorted(x for x in root.rglob("*") if x.is_file()):
            files.append({"file": str(p.relative_to(root)), "size": p.stat().st_size,
                          "checksum": content_checksum(p)})
    ident = {"kind": "orbax", "step": step,
             "model_json_sha256": _sha_file(d / orbax.MODEL_JSON), "files": files}
    return {**ident, "digest": _digest(ident)}


def model_identity(path: str | Path) -> dict[str, Any]:
    """{"kind", "digest", …}: what `path` holds now (HF weights, or the resolved Orbax step)."""
    kind, d = model_kind(path)
    return _hf_identity(d) if kind == "hf" else _orbax_identity(d)


def identity_summary(ident: dict[str, Any]) -> dict[str, Any]:
    """The part stored in eval_config.json: kind, digest and (Orbax) the step."""
    out = {"kind": ident["kind"], "digest": ident["digest"]}
    if ident["kind"] == "orbax":
        out["step"] = ident["step"]
    return out
