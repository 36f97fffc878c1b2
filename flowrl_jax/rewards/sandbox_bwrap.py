"""The bubblewrap (`bwrap`) backend: isolation without root, where user namespaces are allowed.

bwrap builds fresh network, PID, IPC, UTS and mount namespaces (inside an unprivileged user
namespace when the caller is not root) and shows the program an allow-list instead of the host
filesystem: the system directories and /etc read-only, the interpreter's own directories
read-only (wherever they live, as probed by sandbox_mounts), the per-run host dir and the
launcher read-only, a private tmpfs /tmp (the program's workdir) and fresh /proc and /dev.
Nothing else exists inside: not the checkout, not the run directory, not $HOME, not /run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

# System directories bound read-only (a top-level symlink such as /lib -> usr/lib is recreated
# as the same symlink, so merged-/usr and split layouts both work).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# --perms (with --dir) came in bwrap 0.5 (2021); Debian 12 ships 0.8, Ubuntu 22.04 0.6.
# Namespaces bwrap creates; the user namespace comes implicitly when not root.
_UNSHARE = ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try")


def bwrap_path() -> str | None:
    """The bwrap executable on PATH, or None."""
    return shutil.which("bwrap")


@functools.cache
def _version(path: str) -> tuple[int, ...]:
    """bwrap's version, e.g. (0, 8, 0); (0,) when it cannot be read."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in found.groups(default="0")) if found else (0,)


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _covered(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def bwrap_command(needed_dirs: list[str], host_dir: str, launcher: str, tmpfs_mb: int) -> list[str]:
    """argv prefix that runs a command inside the bwrap sandbox (cwd: `host_dir`)."""
    system = tuple(os.path.realpath(p) for p in SYSTEM_DIRS if os.path.isdir(p))
    extra = [d for d in needed_dirs if not _covered(d, system)]
    exe = bwrap_path() or "bwrap"
    # --size (bwrap >= 0.7) caps the private /tmp like namespaces mode; older: RLIMIT_FSIZE only
    size = ["--size", str(tmpfs_mb << 20)] if _version(exe) >= (0, 7) else []
    argv = [exe, *_UNSHARE, "--die-with-parent", "--new-session", *_system_binds(),
            "--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/tmp"]
    # After the tmpfs: dirs under /tmp (a venv, pytest's temp dirs) are bound on top of it.
    # bwrap gives the parents it creates the host's modes (a 0700 /root would stop a dropped
    # uid), so every parent is made first, empty and traversable.
    binds = [*extra, host_dir, launcher]
    made: set[str] = set()
    for path in binds:
        for parent in _parents(path):
            if parent not in made and not _covered(parent, system) and parent != "/tmp":
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
    for path in binds:
        argv += ["--ro-bind", path, path]
    return [*argv, "--chdir", host_dir]


def _parents(path: str) -> list[str]:
    """Proper ancestors of an absolute path, outermost first, "/" excluded."""
    parts = path.rstrip("/").split("/")[1:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
