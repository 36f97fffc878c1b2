"""Read back what an offline W&B run wrote: the history rows of its `run-<id>.wandb` file.

The file is W&B's record log (the LevelDB log layout): a 7-byte header (":W&B", magic 0xBEE1,
version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length, type:
1 full, 2 first, 3 middle, 4 last) around a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7


def records(path: Path) -> list:
    """Every Record in an offline run file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file ({data[:7]!r})"
    pos, chunks, out = _HEADER, [], []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block tail padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        chunks = [chunk] if kind in (1, 2) else [*chunks, chunk]
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
    return out


def complete_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a run file once W&B has written its `exit` record: `run.finish()` can
    return while the service is still writing (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = records(path) if Path(path).stat().st_size >= _HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def history(wandb_dir: Path) -> list[dict]:
    """The logged rows of every offline run under `wandb_dir` (W&B's `_step` etc. included)."""
    rows = []
    for run_file in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in complete_records(run_file):
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows
