"""SHA256SUMS of a data root: written by scripts/, checked by `flowrl-jax data verify`.

The reference list is the one shipped inside the package (`assets/data/SHA256SUMS`), so a
copy elsewhere (`--data-dir`) is checked against what this version of flowrl-jax expects,
not against a list that travelled with the copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

SUMS_FILE = "SHA256SUMS"
# Not checksummed: the list itself and the prose README (edited without touching any data).
UNSUMMED = (SUMS_FILE, "README.md")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    """`relative path → sha256` from a `sha256sum`-format file (`./` prefixes dropped)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}:{n}: not a `sha256sum` line: {line!r:.80}")
        out[name.removeprefix("./")] = digest
    return out


def data_files(root: Path) -> list[str]:
    """Every file under `root` that the checksum list covers, as sorted relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() not in UNSUMMED
                  and "__pycache__" not in p.parts)


def write_sums(root: Path) -> Path:
    """(Re)write `root/SHA256SUMS` over every data file under `root`; returns its path."""
    lines = [f"{sha256_file(root / rel)}  ./{rel}" for rel in data_files(root)]
    out = root / SUMS_FILE
    out.write_text("\n".join(lines) + "\n")
    return out


@dataclass(frozen=True)
class FileProblem:
    """One file that does not match the reference list."""

    path: str
    problem: str  # "missing" | "changed" | "not listed"


def check_sums(root: Path, reference: dict[str, str],
               extra_ok: bool = True) -> list[FileProblem]:
    """Files of `reference` that are missing or changed under `root` (and, unless
    `extra_ok`, files under `root` the reference does not list)."""
    problems = []
    for rel, digest in sorted(reference.items()):
        p = root / rel
        if not p.is_file():
            problems.append(FileProblem(rel, "missing"))
        elif sha256_file(p) != digest:
            problems.append(FileProblem(rel, "changed"))
    if not extra_ok:
        problems += [FileProblem(rel, "not listed") for rel in data_files(root)
                     if rel not in reference]
    return problems
