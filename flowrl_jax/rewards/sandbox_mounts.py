"""What the namespaces sandbox must re-expose so that an interpreter works wherever it lives.

The sandbox masks the world-writable temp dirs with private tmpfs and hides directories that
other users cannot traverse (e.g. /root, a 0700 home or pytest's /tmp/pytest-of-<user>). An
interpreter (venv, pyenv, conda, a checkout's .venv) may live under any of them, so we ask the
interpreter itself which directories it needs (prefixes, stdlib, site-packages, the directories
of its shared libraries, numpy's install dir) and bind exactly those back, read-only. Nothing
else under a hidden or masked directory becomes visible (not the checkout, not other temp files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flowrl_jax.errors import SandboxError  # noqa: F401 (re-exported)

# Private tmpfs mounted over these in namespaces mode (writes vanish with the sandbox).
MASKED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


# Run by the interpreter under test: everything it needs at run time, as real paths.
_PROBE = r"""
import importlib.util, json, os, site, sys, sysconfig
paths = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
         os.path.dirname(os.path.realpath(sys.executable))]
paths += [sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
sites = site.getsitepackages()
paths += sites
for name in ("numpy",):  # packages the reward programs use, wherever they are installed
    spec = importlib.util.find_spec(name)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        paths += [loc, os.path.join(os.path.dirname(os.path.realpath(loc)), name + ".libs")]
with open("/proc/self/maps") as maps:  # libpython, libc, ... (directories of mapped files)
    for line in maps:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.append(os.path.dirname(fields[5].strip()))
real = lambda p: os.path.realpath(p)
print(json.dumps({"sites": [real(p) for p in sites if os.path.isdir(p)],
                  "paths": [real(p) for p in paths if p and os.path.isdir(p)]}))
"""


@dataclass(frozen=True)
class InterpreterLayout:
    """Where an interpreter and its packages live, as the sandbox must see them."""

    exec_path: str  # path to exec: real directory + the link name (keeps a venv's identity)
    site_dirs: tuple[str, ...]  # site-packages (real paths), for PYTHONPATH under `python -S`
    needed_dirs: tuple[str, ...]  # every directory the interpreter reads, real paths, deduped


def exec_path(python: str) -> str:
    """`python` with its directory resolved but its file name kept.

    A venv's bin/python is a symlink to the base interpreter; exec'ing the link (not its
    target) is what makes Python find pyvenv.cfg and the venv's site-packages.
    """
    found = python if os.sep in python else shutil.which(python)
    if not found or not os.path.exists(found):
        raise SandboxError(f"sandbox: interpreter {python!r} does not exist")
    found = os.path.abspath(found)
    return os.path.join(os.path.realpath(os.path.dirname(found)), os.path.basename(found))


def _link_dirs(path: str) -> list[str]:
    """Real directories of every hop of a symlink chain (each hop must resolve in the sandbox)."""
    dirs, seen = [], set()
    while os.path.islink(path) and path not in seen:
        seen.add(path)
        dirs.append(os.path.realpath(os.path.dirname(path)))
        target = os.readlink(path)
        path = os.path.join(os.path.dirname(path), target)
    dirs.append(os.path.realpath(os.path.dirname(path)))
    return dirs


def _outermost(paths: set[str]) -> tuple[str, ...]:
    """Sorted paths with those inside another one of the set dropped."""
    return tuple(sorted(p for p in paths
                        if not any(o != p and p.startswith(o.rstrip("/") + "/") for o in paths)))


def probe_interpreter(python: str) -> InterpreterLayout:
    """Ask `python` which directories it needs; raises SandboxError if it cannot run."""
    path = exec_path(python)
    try:
        out = subprocess.run([path, "-I", "-c", _PROBE], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"sandbox: interpreter {python!r} cannot run: {exc}") from exc
    if out.returncode != 0:
        raise SandboxError(f"sandbox: interpreter {python!r} failed its probe "
                           f"(exit {out.returncode}): {out.stderr.strip()[-300:]}")
    info = json.loads(out.stdout)
    needed = {*info["paths"], *_link_dirs(path)} - {"/"}
    return InterpreterLayout(path, tuple(info["sites"]), _outermost(needed))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_plan(needed_dirs: tuple[str, ...] | list[str],
               masked: tuple[str, ...] = MASKED_DIRS) -> tuple[list[str], list[str]]:
    """(dirs to hide behind an empty tmpfs, dirs to bind back read-only) for `needed_dirs`.

    A needed dir is bound back if it lies under a masked dir or under an ancestor that other
    users cannot traverse (that ancestor is hidden); all other dirs are already reachable.
    """
    masked_real = {os.path.realpath(m) for m in masked}
    hide: set[str] = set()
    rebind: set[str] = set()
    for path in needed_dirs:
        if any(_under(path, m) for m in masked_real):
            if path not in masked_real:
                rebind.add(path)
            continue
        parts = Path(path).parts
        for i in range(2, len(parts)):  # proper ancestors, outermost first
            ancestor = str(Path(*parts[:i]))
            if not os.stat(ancestor).st_mode & 0o001:  # others cannot traverse it
                hide.add(ancestor)
                rebind.add(path)
                break
    return list(_outermost(hide)), list(_outermost(rebind))
