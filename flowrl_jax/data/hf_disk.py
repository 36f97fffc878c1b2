"""Rows of a directory written by Hugging Face `datasets` (`Dataset.save_to_disk`), read with pyarrow.

The `datasets` package is not a dependency: its on-disk layout is small and stable. A saved
`Dataset` is a folder with `state.json` (listing its shards under `_data_files`),
`dataset_info.json` and the shards `data-0000K-of-0000N.arrow` in Arrow IPC *stream* format.
A saved `DatasetDict` is a folder with `dataset_dict.json` (`{"splits": [...]}`) and one such
folder per split; a data set names one split folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

STATE_FILE = "state.json"
DICT_FILE = "dataset_dict.json"


class SavedDatasetError(ValueError):
    """The folder is not a readable `save_to_disk` data set; the message says why."""


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / DICT_FILE).is_file())


def shard_files(path: Path) -> list[Path]:
    """The Arrow shards of a saved `Dataset`, in order; a DatasetDict root asks for a split."""
    if (path / DICT_FILE).is_file() and not (path / STATE_FILE).is_file():
        try:
            splits = json.loads((path / DICT_FILE).read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SavedDatasetError(f"{path / DICT_FILE}: unreadable ({e})") from None
        raise SavedDatasetError(
            f"{path} is a saved DatasetDict with splits {', '.join(map(str, splits))}; "
            f"set the path to one split folder, e.g. {path / str(splits[0] if splits else 'train')}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SavedDatasetError(f"{path / STATE_FILE}: no readable `_data_files` list ({e})") from None
    files = [path / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SavedDatasetError(f"{path}: shard(s) listed in {STATE_FILE} are missing: "
                                + ", ".join(missing))
    return files


def iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for each row; location names the folder, row number and shard."""
    import pyarrow as pa  # local import: only users of saved data sets pay for it

    index = 0
    for shard in shard_files(path):
        try:
            with pa.OSFile(str(shard), "rb") as f:
                reader = pa.ipc.open_stream(f)
                for batch in reader:
                    for row in batch.to_pylist():
                        yield f"{path}: row {index} (shard {shard.name})", row
                        index += 1
        except pa.ArrowInvalid as e:
            raise SavedDatasetError(f"{shard}: cannot read as an Arrow stream: {e}") from None
