"""Minimal safetensors reader/writer that streams one tensor at a time.

We parse the (simple, documented) safetensors header ourselves so that we can validate
every offset against the file size before touching data (a truncated file must give an
error naming file and tensor, never a SIGBUS from a mapping past EOF), read each tensor on
its own straight into the memory it will live in (`read_tensor`) and write shards tensor by
tensor without holding a whole shard in memory.
Format: 8-byte little-endian header length N, N bytes of JSON header, then the data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import ml_dtypes
import numpy as np
from flowrl_jax.errors import CheckpointError  # noqa: F401 (re-exported)

# safetensors dtype code ↔ numpy dtype (bfloat16 through ml_dtypes; numpy has none).
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a .safetensors header; every error names the file (and tensor)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header "
                                      f"length {n} but the file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON): {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            s, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {name!r}: bad header entry {info!r} "
                                  f"({type(err).__name__}: {err})") from err
        if e - s != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or s < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: byte range [{s}, {e}) does not "
                                  f"match shape {shape} × {dtype.name}")
        if base + e > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at "
                                  f"byte {base + e} but the file has {size} bytes")
        out[name] = TensorEntry(name, path, dtype, shape, base + s, base + e)
    return out


# PJRT's CPU client uses a host array as the device buffer itself (no copy) when it is
# read-only and 64-byte aligned; on accelerators the same array is the DMA source.
ZERO_COPY_ALIGN = 64
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux ≥ 5.14


def _anonymous_buffer(nbytes: int) -> mmap.mmap:
    """Fresh page-aligned memory, pre-faulted in one call (MADV_POPULATE_WRITE) rather than
    by one page fault per 4 KiB during the read. (Huge pages were measured too: fast once
    available, but a fresh process stalls seconds in kernel compaction to get them.)"""
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # an older kernel: plain page faults still work
        pass
    return buf


def _map_resident(entry: TensorEntry) -> np.ndarray:
    """A read-only mapping of the tensor's bytes, pre-faulted (MAP_POPULATE): the page-cache
    pages themselves, with no copy; they stay valid even if the file is later replaced."""
    page = mmap.ALLOCATIONGRANULARITY
    base = entry.start - entry.start % page
    with open(entry.file, "rb") as f:
        if os.fstat(f.fileno()).st_size < entry.end:  # shrunk since the header was read
            raise CheckpointError(f"{entry.file}: truncated safetensors file: tensor "
                                  f"{entry.name!r} ends at byte {entry.end}")
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(f.fileno(), entry.end - base, flags=flags, prot=mmap.PROT_READ,
                           offset=base)
    count = entry.nbytes // entry.dtype.itemsize
    return np.frombuffer(mapped, entry.dtype, count, entry.start - base).reshape(entry.shape)


def _read_into(entry: TensorEntry, out: memoryview) -> None:
    """Read the tensor's bytes into `out` (one copy from the page cache)."""
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            k = f.readinto(out[done:entry.nbytes])
            if not k:
                raise CheckpointError(f"{entry.file}: truncated safetensors file: tensor "
                                      f"{entry.name!r} ends at byte {entry.end}")
            done += k


def read_tensor(entry: TensorEntry, dtype: Any = None) -> np.ndarray:
    """One tensor as a read-only host array in `dtype` (default: its own), 64-byte aligned.

    Same dtype and an aligned offset: the file's pages mapped in place (no copy at all).
    Otherwise one read (or cast) into fresh pre-faulted memory. Either way jax can adopt the
    result as a CPU device buffer without copying it again.
    """
    target = np.dtype(dtype or entry.dtype)
    count = entry.nbytes // entry.dtype.itemsize
    try:
        if count == 0:
            out = np.zeros(entry.shape, target)
        elif target == entry.dtype and entry.start % ZERO_COPY_ALIGN == 0:
            out = _map_resident(entry)
        elif target == entry.dtype:
            buf = _anonymous_buffer(entry.nbytes)
            _read_into(entry, memoryview(buf))
            out = np.frombuffer(buf, target, count).reshape(entry.shape)
        else:
            src = _map_resident(entry)
            buf = _anonymous_buffer(count * target.itemsize)
            out = np.frombuffer(buf, target, count).reshape(entry.shape)
            np.copyto(out, src, casting="unsafe")
            del src
    except OSError as e:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r}: read failed: {e}") from e
    out.flags.writeable = False
    return out


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB', '20KB'."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"shard size {size!r}: expected bytes or e.g. '5GB', '500MB'") from None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, dtype, shape and a function producing its host value."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_file(path: Path, specs: Iterable[TensorSpec], metadata: Optional[dict[str, str]] = None) -> None:
    """Write a .safetensors file tensor by tensor (header first, from shapes); atomic rename."""
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for sp in specs:
        header[sp.name] = {"dtype": NP_TO_ST[sp.dtype], "shape": list(sp.shape),
                           "data_offsets": [offset, offset + sp.nbytes]}
        offset += sp.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Data starts 64-byte aligned (the format allows header padding with spaces): with
    # tensor sizes that are multiples of 64 bytes, as in Qwen2 models, every tensor can then
    # be imported without a copy (see read_tensor).
    raw += b" " * (-(8 + len(raw)) % ZERO_COPY_ALIGN)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for sp in specs:
            arr = np.ascontiguousarray(sp.fetch(), dtype=sp.dtype)
            if arr.shape != sp.shape:
                raise CheckpointError(f"{path}: tensor {sp.name!r} has shape {arr.shape}, "
                                      f"expected {sp.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # bf16 has no buffer format
            del arr
    os.replace(tmp, path)
