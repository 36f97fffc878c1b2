"""Run directories that may be local paths or object-store URLs (gs://bucket/run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowrl_jax.errors import ConfigError


def is_url(path: Any) -> bool:
    """Whether `path` names an object-store location rather than a local file."""
    return "://" in str(path)


def as_path(path: Any) -> Any:
    """A local `Path`, or an etils `epath.Path` (same interface) for a URL."""
    if is_url(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


def check_output_dir(path: Any, flag: str = "--out") -> None:
    """ConfigError naming `flag` when a local output directory cannot be made: it, or the
    nearest existing folder above it, is a file, or that folder is not writable."""
    if is_url(path):
        return  # object stores have no files in the way; access errors surface on write
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{flag} {path}: is a file, not a directory")
        probe = p
    else:
        probe = p.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{flag} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {probe} is not writable")
