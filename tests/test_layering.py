"""The folders are layers: the lower ones import nothing from the ones above (DESIGN.md)."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowrl_jax"

#: folder → the packages it must never import (at module level or inside a function)
FORBIDDEN = {
    "models": ("rl", "eval", "sampling", "commands", "checkpoint", "aot"),
    "algos": ("rl", "eval", "sampling", "commands", "checkpoint", "aot"),
    "rewards": ("rl", "eval", "sampling", "commands", "checkpoint", "models", "aot"),
    "data": ("rl", "eval", "sampling", "commands", "checkpoint", "models", "aot"),
    "checkpoint": ("rl", "eval", "sampling", "commands", "aot"),
    "sampling": ("rl", "eval", "data", "checkpoint", "commands", "aot"),
    "eval": ("rl", "commands", "aot"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from flowrl_jax import rl` imports the package rl
            out += [(node.lineno, f"{base}.{a.name}" if base == "flowrl_jax" else base)
                    for a in node.names]
    return out


def violations(folder: str) -> list[str]:
    """'file:line imports module' for each import of a forbidden package from `folder`."""
    bad = tuple(f"flowrl_jax.{p}" for p in FORBIDDEN[folder])
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, mod in imported_modules(path):
            if mod in bad or mod.startswith(tuple(b + "." for b in bad)):
                found.append(f"{path.relative_to(PACKAGE)}:{line} imports {mod}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(folder):
    assert (PACKAGE / folder).is_dir()
    assert violations(folder) == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    pkg = tmp_path / "flowrl_jax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "bad.py").write_text(
        "import os\n\ndef f():\n    from flowrl_jax.rl.trainer import Trainer\n"
        "    from ..sampling import engine\n    from flowrl_jax import checkpoint\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert violations("models") == ["models/bad.py:4 imports flowrl_jax.rl.trainer",
                                    "models/bad.py:5 imports flowrl_jax.sampling",
                                    "models/bad.py:6 imports flowrl_jax.checkpoint"]
