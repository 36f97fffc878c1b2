"""Run directories that may be local paths or object-store URLs (gs://bucket/run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_url(path: Any) -> bool:
    """Whether `path` names an object-store location rather than a local file."""
    return "://" in str(path)


def as_path(path: Any) -> Any:
    """A local `Path`, or an etils `epath.Path` (same interface) for a URL."""
    if is_url(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)
