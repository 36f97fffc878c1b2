"""The one record type every data set maps to, and row readers for jsonl(.gz), json, parquet
and folders saved by Hugging Face `datasets` (`save_to_disk`).

Readers yield `(location, row)` pairs where `location` names the file and the line (jsonl),
element (json) or row (parquet, saved data sets), so that any error about a row can say
exactly where it is.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from flowrl_jax.data.hf_disk import SavedDatasetError, is_saved_dataset, iter_saved_dataset
from flowrl_jax.errors import DataError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

GroundTruth = Union[str, dict]


class BadRow(ValueError):
    """Raised by a row parser; the reader adds the file and line/row to the message."""


class DropRow(Exception):
    """Raised by a registry parser for a known fault of a shipped file: dropped and counted."""


@dataclass(frozen=True)
class Record:
    """One prompt of any data set.

    `prompt` is the raw problem text (before any template); `ground_truth` is the gold answer
    string (math) or a dict of tests (code); `data_source` is the reward registry key;
    `template` is the prompt template kind (`math`, `code` or `none`); `extra` holds the
    set-specific fields a grader or report may want (e.g. `starter_code`, `unit`).
    """

    id: str
    prompt: str
    ground_truth: GroundTruth
    data_source: str
    template: str = "math"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A plain JSON-able dict of the record."""
        return dataclasses.asdict(self)


@dataclass
class LoadStats:
    """How many rows a load read, kept and skipped (bad rows), with the first few reasons."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    dropped: int = 0  # known faults of shipped files (e.g. MATH-train rows without an answer)
    reasons: list[str] = field(default_factory=list)

    def add_skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 20:
            self.reasons.append(reason)

    def merge(self, other: "LoadStats") -> None:
        self.read += other.read
        self.kept += other.kept
        self.skipped += other.skipped
        self.dropped += other.dropped
        self.reasons.extend(other.reasons[: max(0, 20 - len(self.reasons))])


FORMATS = ("jsonl", "json", "parquet", "hf_dataset")


def infer_format(path: Path) -> str:
    """jsonl / json / parquet from the file name (`.jsonl.gz` and `.json.gz` allowed), or
    hf_dataset for a folder written by `datasets`' `save_to_disk`."""
    if path.is_dir():
        if is_saved_dataset(path):
            return "hf_dataset"
        raise DataError(f"{path} is a folder but not one saved by `datasets` (no state.json or "
                        f"dataset_dict.json); name a data file or a save_to_disk folder")
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt, exts in (("jsonl", (".jsonl", ".ndjson")), ("json", (".json",)),
                      ("parquet", (".parquet", ".pq"))):
        if name.endswith(exts):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the extension; "
                    f"set `format` to one of {FORMATS}")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, "r", encoding="utf-8-sig")  # tolerate a BOM


def iter_rows(path: Union[str, Path], fmt: Optional[str] = None,
              on_bad_row: str = "error", stats: Optional[LoadStats] = None
              ) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for every row; undecodable jsonl lines raise or are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (fix the path, or point data.data_dir / "
                        f"$FLOWRL_DATA_DIR at a full data copy; `flowrl-jax data verify` checks one)")
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if path.is_dir() != (fmt == "hf_dataset"):
        raise DataError(f"{path}: format {fmt} needs "
                        + ("a folder saved by `datasets`" if fmt == "hf_dataset" else "a file"))
    stats = stats if stats is not None else LoadStats()
    if fmt == "jsonl":
        with _open_text(path) as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except (UnicodeDecodeError, OSError, EOFError) as e:
                    # A broken byte sequence or gzip stream cannot be resynchronised: stop here.
                    raise DataError(f"{path}:{lineno + 1}: cannot decode the file: {e}") from e
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                loc = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(loc, f"undecodable JSON line ({e.msg} at column {e.colno})",
                         on_bad_row, stats)
                    continue
                yield loc, row
    elif fmt == "json":
        try:
            with _open_text(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: undecodable JSON ({e.msg} at column {e.colno}); "
                            f"a .json data file must be one JSON list of objects") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: cannot decode the file as UTF-8: {e}") from e
        if isinstance(data, dict):
            # Accept {"data": [...]} style wrappers with a single list value.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of objects, got an object with "
                                f"keys {sorted(data)[:10]}")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{path}: element {i}", row
    elif fmt == "hf_dataset":
        try:
            yield from iter_saved_dataset(path)
        except SavedDatasetError as e:
            raise DataError(str(e)) from e
    else:
        import pyarrow.parquet as pq  # local import: only parquet users pay for it

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read as parquet: {e}") from e
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}: row {i}", row
                i += 1


def _bad(loc: str, reason: str, on_bad_row: str, stats: LoadStats) -> None:
    msg = f"{loc}: {reason}"
    if on_bad_row == "skip":
        stats.add_skip(msg)
        return
    raise DataError(msg + " (set data.on_bad_row=skip to skip bad rows)")


def get_field(row: Any, dotted: str) -> Any:
    """Look up `a.b.0.c` in nested dicts/lists; BadRow names the missing part."""
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                raise BadRow(f"missing field {dotted!r}"
                             + (f" (no {part!r})" if part != dotted else ""))
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit():
            idx = int(part)
            if not -len(cur) <= idx < len(cur):
                raise BadRow(f"field {dotted!r}: index {idx} out of range (length {len(cur)})")
            cur = cur[idx]
        else:
            raise BadRow(f"field {dotted!r}: cannot look up {part!r} in a "
                         f"{type(cur).__name__}")
    return cur


def require_str(value: Any, name: str, allow_empty: bool = False) -> str:
    """`value` as a non-empty string, else BadRow naming the field."""
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"field {name!r} is empty")
    return value


def read_records(path: Union[str, Path], parse: Callable[[Any, int], Record],
                 fmt: Optional[str] = None, on_bad_row: str = "error",
                 limit: Optional[int] = None) -> tuple[list[Record], LoadStats]:
    """Parse every row of a file into Records; bad rows raise (naming file+line) or are skipped."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    stats = LoadStats()
    out: list[Record] = []
    index = 0  # position among decodable rows: the fallback id of sets without an id field
    for loc, row in iter_rows(path, fmt, on_bad_row, stats):
        index += 1
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object, got {type(row).__name__}")
            rec = parse(row, index - 1)
        except BadRow as e:
            _bad(loc, str(e), on_bad_row, stats)
            continue
        except DropRow as e:
            stats.dropped += 1
            log.info("%s: dropped (%s)", loc, e)
            continue
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    stats.kept = len(out)
    stats.read = stats.kept + stats.skipped + stats.dropped
    if stats.skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", path, stats.skipped, stats.reasons[0])
    return out, stats
