"""Check a data root against this version's shipped checksums and registered row counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flowrl_jax.data.manifest import SUMS_FILE, check_sums, read_sums
from flowrl_jax.data.records import DataError
from flowrl_jax.data.registry import PACKAGED_DATA_DIR, REGISTRY, load_dataset


@dataclass
class VerifyReport:
    """What `verify_data_root` found: checked counts and one line per problem."""

    root: Path
    files_checked: int = 0
    sets_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def license_name(folder: Path) -> str:
    """A short name of the license in `folder/LICENSE` (MIT, Apache-2.0), or why there is none."""
    path = folder / "LICENSE"
    if not path.is_file():
        return "missing"
    head = path.read_text(errors="replace")[:400]
    if "Apache License" in head and "2.0" in head:
        return "Apache-2.0"
    if head.lstrip().startswith(("MIT License", "The MIT License")):
        return "MIT"
    return "see LICENSE"


def verify_data_root(root: Path, reference: Path = PACKAGED_DATA_DIR / SUMS_FILE) -> VerifyReport:
    """Checksums of every listed file and the row count of every registered set under `root`."""
    report = VerifyReport(root)
    sums = read_sums(reference)
    report.files_checked = len(sums)
    bad_files = set()
    for p in check_sums(root, sums):
        what = "sha256 differs from SHA256SUMS" if p.problem == "changed" else p.problem
        report.problems.append(f"{root / p.path}: {what}")
        bad_files.add(p.path)
    for name, info in REGISTRY.items():
        if info.path in bad_files and not (root / info.path).is_file():
            continue  # already named as missing
        report.sets_checked += 1
        try:
            loaded = load_dataset(name, root)
        except DataError as e:
            report.problems.append(f"{name}: {e}")
            continue
        if loaded.stats.read != info.num_rows:
            report.problems.append(f"{name}: {root / info.path} has {loaded.stats.read} rows, "
                                   f"expected {info.num_rows}")
    return report
