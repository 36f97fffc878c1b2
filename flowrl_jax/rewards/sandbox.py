"""Run untrusted Python programs in a sandbox (SPEC §3): one fresh process tree per program.

Design (namespaces mode, used when running as root with a working `unshare`):
- `unshare --net --pid --mount --fork --mount-proc --kill-child` gives the program no network
  (a fresh net namespace has only a down loopback), its own /proc, and a PID namespace whose
  init is our launcher: when the launcher exits or is killed, the kernel kills every process left
  inside, so double-forked daemons cannot survive.
- The launcher mounts private tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock (writes vanish
  with the namespace), hides non-world-readable ancestors of the interpreter (e.g. /root) behind
  an empty tmpfs, then binds back read-only exactly the directories the interpreter needs
  (prefixes, stdlib, site-packages, shared-library dirs; see sandbox_mounts.py), so a venv under
  /tmp, /root or a 0700 home works while the rest of those directories stays hidden.
- The program gets an empty environment (PATH, HOME, LANG, thread caps), rlimits on CPU seconds,
  address space, processes, file size and open files, a uid/gid of its own (`uid_base + slot`,
  slots unique across processes on the host, so one fork bomb cannot exhaust another sandbox's
  RLIMIT_NPROC), no supplementary groups, no_new_privs and a seccomp deny-list (no user
  namespaces, setns, mount, ptrace, bpf, io_uring, keyrings, module loading).
- Fast start: the launcher forks, drops privileges and runs the program in the forked
  interpreter (`runpy`), one Python start per run instead of two (`fast_startup=False` execs
  `python -B -s main.py` instead).
- Wall-clock timeouts are enforced by the launcher (kill the program's process group) with a
  backstop in the parent (SIGKILL the launcher's process group, which tears the namespace down);
  stdout is capped; the host temp dir is always removed.
- A sandbox that cannot be set up raises SandboxError (never a silent zero reward): the launcher
  reports set-up failures, and that the program started, on a status pipe the program cannot
  write to (it is closed before the program runs), so a program cannot fake either.
Without root (bwrap mode, see sandbox_bwrap.py): bubblewrap builds the namespaces in an
unprivileged user namespace and shows the program only the system directories, the
interpreter's directories (read-only) and a private tmpfs /tmp; the launcher runs inside it as in
namespaces mode, without the uid drop (a user namespace maps only the caller's uid).
Backends are tried in ISOLATING_BACKENDS order; the first that runs a probe program is used and
logged once. If none works, `policy="required"` (the default) raises SandboxError saying what to
install; `policy="best_effort"` falls back to "plain" mode with one warning: the same launcher
without namespaces, a child subreaper that kills all descendants when the program ends, uid drop
only as root, and no network or filesystem isolation.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowrl_jax.errors import ConfigError
from flowrl_jax.rewards.sandbox_bwrap import bwrap_command, bwrap_path
from flowrl_jax.rewards.sandbox_mounts import (
    MASKED_DIRS,
    InterpreterLayout,
    SandboxError,
    mount_plan,
    probe_interpreter,
)

logger = logging.getLogger(__name__)

_LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
EXIT_TIMEOUT = 124
_UNSHARE_ARGS = ("--net", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child")
#: backends that isolate (network, PID, filesystem), in the order `auto` tries them
ISOLATING_BACKENDS = ("namespaces", "bwrap")
POLICIES = ("required", "best_effort")
#: policy of a SandboxConfig that names none (the test suite lowers it on unisolated machines)
DEFAULT_POLICY = "required"
INSTALL_HINT = ("install bubblewrap (`apt install bubblewrap`; the kernel must allow unprivileged "
                "user namespaces) or run as root with `unshare` (util-linux)")


@dataclass(frozen=True)
class SandboxConfig:
    """Resource limits and isolation settings for one sandboxed run."""

    memory_mb: int = 2048  # RLIMIT_AS
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_file_mb: int = 64  # RLIMIT_FSIZE
    max_open_files: int = 256  # RLIMIT_NOFILE
    tmpfs_mb: int = 256  # private /tmp size (namespaces mode)
    max_output_bytes: int = 16 << 20  # stdout cap; exceeding it kills the program
    max_stderr_bytes: int = 64 << 10  # stderr kept (the rest is discarded)
    startup_grace_s: float = 5.0  # parent-side backstop on top of the program timeout
    isolation: str = "auto"  # backend: auto | namespaces | bwrap | plain
    # required | best_effort (auto may then fall back to plain, warned); default: DEFAULT_POLICY
    policy: str = field(default_factory=lambda: DEFAULT_POLICY)
    uid_base: int = 2_000_000_000  # per-slot uids: uid_base + slot (root only)
    python: str = sys.executable  # interpreter for the untrusted program
    # run the program with `python -S` and site-packages on PYTHONPATH: skips .pth processing
    # (~50-70 ms per run with an editable install); exit()/quit() are re-added by a prologue
    fast_startup: bool = True
    seccomp: bool = True  # deny namespace/mount/ptrace/bpf/io_uring/... syscalls (x86_64, aarch64)
    host_tmp_dir: str | None = None  # where per-run host dirs are made (None: system temp dir)

    def __post_init__(self) -> None:
        if self.isolation not in ("auto", "plain", *ISOLATING_BACKENDS):
            raise ConfigError(f"SandboxConfig.isolation: {self.isolation!r} is not one of "
                               f"{['auto', *ISOLATING_BACKENDS, 'plain']}")
        if self.policy not in POLICIES:
            raise ConfigError(f"SandboxConfig.policy: {self.policy!r} is not one of {list(POLICIES)}")


@dataclass
class RunResult:
    """Outcome of one sandboxed run."""

    status: str  # ok | error | timeout | output_limit (set-up failures raise SandboxError)
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def ok(self) -> bool:
        """True if the program exited 0 within its limits."""
        return self.status == "ok"


class _SlotAllocator:
    """Hands out small integers, one per running sandbox, unique across processes on this host.

    A slot is held as an exclusive flock on `<tmp>/flowrl_sandbox_slots/<n>.lock`, so trainer
    and eval worker processes never run two programs under the same uid at once (RLIMIT_NPROC
    counts per uid). Falls back to per-process slots if the lock dir is unusable.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local_free: set[int] = set()
        self._local_next = 0
        self._held: dict[int, int] = {}  # slot -> fd

    def _lock_dir(self) -> str | None:
        path = os.path.join(tempfile.gettempdir(), f"flowrl_sandbox_slots_{os.geteuid()}")
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            return path
        except OSError:
            return None

    def acquire(self) -> int:
        lock_dir = self._lock_dir()
        if lock_dir is not None:
            for slot in range(100_000):
                try:
                    fd = os.open(os.path.join(lock_dir, f"{slot}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
                except OSError:
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                with self._lock:
                    self._held[slot] = fd
                return slot
        with self._lock:  # fallback: unique within this process only
            if self._local_free:
                slot = min(self._local_free)
                self._local_free.discard(slot)
                return slot
            self._local_next += 1
            return self._local_next - 1

    def release(self, slot: int) -> None:
        with self._lock:
            fd = self._held.pop(slot, None)
            if fd is None:
                self._local_free.add(slot)
        if fd is not None:
            os.close(fd)  # closing drops the flock


_slots = _SlotAllocator()
_mode_lock = threading.Lock()
_mode_cache: dict[tuple, tuple[str, int | None]] = {}


def _program_env(home: str, tmpdir: str) -> dict[str, str]:
    # Only what a Python program needs; nothing from the trainer's environment leaks in.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": tmpdir, "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


# `python -S` drops site's exit()/quit() builtins, which competitive programs use.
_PROLOGUE = "import builtins as _fb, sys as _fs\n_fb.exit = _fb.quit = _fs.exit\ndel _fb, _fs\n"
_FUTURE = re.compile(r"^from[ \t]+__future__[ \t]+import[^\n]*\n?", re.MULTILINE)


def _hoist_future(source: str) -> str:
    """Move `from __future__ import` lines to the top (they must precede any prologue)."""
    futures = _FUTURE.findall(source)
    if not futures:
        return source
    return "".join(f if f.endswith("\n") else f + "\n" for f in futures) + _FUTURE.sub("", source)


class _Interpreter:
    """An interpreter's layout and the sandbox mounts it needs, probed once per path."""

    def __init__(self, python: str) -> None:
        self.layout: InterpreterLayout = probe_interpreter(python)
        self.mounts: tuple[list[str], list[str]] = mount_plan(self.layout.needed_dirs)


_interpreters: dict[str, _Interpreter] = {}
_interpreters_lock = threading.Lock()


def _interpreter(python: str) -> _Interpreter:
    with _interpreters_lock:
        if python not in _interpreters:
            _interpreters[python] = _Interpreter(python)
        return _interpreters[python]


def _read_status(fd: int) -> str:
    """Whatever the launcher wrote on the status pipe (every writer has exited by now)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _run_once(source: str, stdin: str, timeout_s: float, cfg: SandboxConfig, mode: str,
              uid: int | None) -> RunResult:
    interp = _interpreter(cfg.python)
    python = interp.layout.exec_path
    mounts = interp.mounts if mode == "namespaces" else ([], [])
    isolated = mode in ISOLATING_BACKENDS
    host_dir = tempfile.mkdtemp(prefix="flowrl_sbx_", dir=cfg.host_tmp_dir)
    start = time.monotonic()
    proc = None
    status_r, status_w = os.pipe()
    try:
        workdir = "/tmp/sandbox" if isolated else os.path.join(host_dir, "work")
        if mode == "plain" and uid is not None:
            os.chmod(host_dir, 0o711)  # the dropped uid must reach host_dir/work
        env = _program_env(workdir, "/tmp" if isolated else workdir)
        argv = [python, "-B", "-s", "main.py"]
        if cfg.fast_startup:
            argv = [python, "-B", "-S", "main.py"]
            env["PYTHONPATH"] = os.pathsep.join(interp.layout.site_dirs)
            source = _hoist_future(_PROLOGUE + source)
        files = {"main.py": source.encode("utf-8", "surrogatepass"),
                 "stdin.txt": stdin.encode("utf-8", "surrogatepass")}
        for name, data in files.items():
            with open(os.path.join(host_dir, name), "wb") as f:
                f.write(data)
        cpu_s = int(math.ceil(timeout_s)) + 1
        config = {
            "mode": mode, "files": list(files), "stdin_file": "stdin.txt", "timeout_s": timeout_s,
            "uid": uid, "gid": uid, "hide": mounts[0], "rebind": mounts[1], "tmpfs_mb": cfg.tmpfs_mb,
            "masked": list(MASKED_DIRS), "status_fd": status_w,
            "argv": argv, "env": env, "seccomp": cfg.seccomp,
            # same interpreter as the launcher: run the program in the forked launcher itself
            "inproc": cfg.fast_startup and os.path.realpath(python) == os.path.realpath(sys.executable),
            "pythonpath": list(interp.layout.site_dirs) if cfg.fast_startup else [],
            "limits": {"cpu_s": cpu_s, "as_bytes": cfg.memory_mb << 20, "nproc": cfg.max_processes,
                       "fsize_bytes": cfg.max_file_mb << 20, "nofile": cfg.max_open_files},
        }
        with open(os.path.join(host_dir, "config.json"), "w") as f:
            json.dump(config, f)
        cmd = [sys.executable, "-I", "-S", "-B", _LAUNCHER, host_dir]
        if mode == "namespaces":
            cmd = [shutil.which("unshare") or "unshare", *_UNSHARE_ARGS, *cmd]
        elif mode == "bwrap":  # only the interpreters' dirs exist inside: exec them by real dir
            launcher_python = _interpreter(sys.executable).layout
            needed = {*interp.layout.needed_dirs, *launcher_python.needed_dirs}
            cmd = [*bwrap_command(sorted(needed), host_dir, _LAUNCHER, cfg.tmpfs_mb),
                   launcher_python.exec_path, *cmd[1:]]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd=host_dir, close_fds=True,
            pass_fds=(status_w,), process_group=0,
        )
        os.close(status_w)
        status_w = -1
        out, err, why = _collect(proc, start + timeout_s + cfg.startup_grace_s, cfg)
        if why is not None:  # output cap or parent-side backstop: kill the whole tree now
            _killpg(proc)
        rc = proc.wait()
        wall = time.monotonic() - start
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        report = _read_status(status_r)
        if "setup-error:" in report:
            raise SandboxError(f"sandbox ({mode} mode) could not be set up: "
                               f"{report.split('setup-error:', 1)[1].strip()}")
        if why is None and "started" not in report:  # died before the program could run
            raise SandboxError(f"sandbox ({mode} mode) launcher exited {rc} before starting the "
                               f"program: {stderr.strip()[-300:] or 'no message'}")
        if why == "output_limit":
            status = "output_limit"
        elif why == "timeout" or rc == EXIT_TIMEOUT:
            status = "timeout"
        elif rc == 0:
            status = "ok"
        else:
            status = "error"
        return RunResult(status, rc, stdout, stderr, wall)
    finally:
        if proc is not None and proc.poll() is None:
            _killpg(proc)
            proc.wait()
        for stream in (proc.stdout, proc.stderr) if proc is not None else ():
            stream.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(host_dir, ignore_errors=True)


def _killpg(proc: subprocess.Popen) -> None:
    # Safe while `proc` is unreaped: its pid (= pgid) cannot have been reused yet.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, deadline: float, cfg: SandboxConfig) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until EOF; stop early on the deadline or the stdout cap."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), "timeout"
            for key, _ in sel.select(min(remaining, 1.0)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                if buf is out:
                    out += chunk
                    if len(out) > cfg.max_output_bytes:
                        return bytes(out[: cfg.max_output_bytes]), bytes(err), "output_limit"
                elif len(err) < cfg.max_stderr_bytes:
                    err += chunk[: cfg.max_stderr_bytes - len(err)]
    return bytes(out), bytes(err), None


def _probe_program(site_dirs: tuple[str, ...]) -> str:
    """Prints 42 iff the stdlib imports and every site-packages dir is reachable inside."""
    return ("import decimal, os\n"
            f"missing = [p for p in {list(site_dirs)!r} if not os.path.isdir(p)]\n"
            "print(f'site-packages not reachable: {missing}' if missing else 6 * 7)\n")


def isolation_mode(cfg: SandboxConfig | None = None) -> tuple[str, int | None]:
    """(backend, uid base) chosen once per config: the first isolating backend that works,
    else plain mode under `policy="best_effort"`, else SandboxError saying what to install."""
    cfg = cfg or SandboxConfig()
    key = (cfg.isolation, cfg.policy, cfg.uid_base, cfg.python, ISOLATING_BACKENDS)
    with _mode_lock:
        if key not in _mode_cache:
            _mode_cache[key] = _probe(cfg)
            mode, uid = _mode_cache[key]
            logger.info("sandbox: code runs in the %s backend (uid %s)", mode,
                        "dropped to a per-slot id" if uid not in (None, 65534) else uid)
        return _mode_cache[key]


def _candidates(cfg: SandboxConfig, root: bool) -> list[tuple[str, int | None]]:
    """(backend, uid base) pairs to try, in order (uid None: programs keep the caller's uid)."""
    wanted = ISOLATING_BACKENDS if cfg.isolation == "auto" else (cfg.isolation,)
    out: list[tuple[str, int | None]] = []
    for backend in wanted:
        if backend == "namespaces" and root and shutil.which("unshare"):
            out += [("namespaces", cfg.uid_base), ("namespaces", 65534)]
        elif backend == "bwrap" and bwrap_path():
            # as root bwrap keeps the caller's ids, so the launcher drops them as in namespaces
            # mode; without root a user namespace maps only the caller's uid: no drop
            out += [("bwrap", cfg.uid_base), ("bwrap", 65534)] if root else [("bwrap", None)]
    if cfg.isolation == "plain" or (cfg.isolation == "auto" and cfg.policy == "best_effort"):
        if root:
            out.append(("plain", 65534))
        # untrusted code as root with no isolation at all only when explicitly asked for
        if not root or cfg.isolation == "plain":
            out.append(("plain", None))
    return out


def _probe(cfg: SandboxConfig) -> tuple[str, int | None]:
    root = os.geteuid() == 0
    _interpreter(cfg.python)  # a missing or broken interpreter is named as such, not as isolation
    candidates = _candidates(cfg, root)
    reasons = []
    for mode, uid in candidates:
        try:
            res = _run_once(_probe_program(_interpreter(cfg.python).layout.site_dirs), "", 30.0,
                            cfg, mode, uid)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next option"
            reasons.append(f"{mode}/uid={uid}: {exc}")
            continue
        if res.ok and res.stdout.strip() == "42":
            if mode == "plain" or uid == 65534:
                logger.warning(
                    "sandbox: using %s mode with uid %s (%s). %s", mode, uid,
                    "; ".join(reasons) or "no isolating backend on this machine",
                    "Programs share one uid for RLIMIT_NPROC." if uid == 65534 else
                    "No network/PID/mount isolation: untrusted code is only rlimited and killed.")
            return mode, uid
        reasons.append(f"{mode}/uid={uid}: {res.status} rc={res.returncode} "
                       f"{res.stdout.strip()[-200:]} {res.stderr.strip()[-200:]}")
    tried = "; ".join(reasons) or (
        f"none available: namespaces need root and `unshare`"
        f"{' (not root)' if not root else ''}, bwrap needs the `bwrap` program"
        f"{' (not found)' if not bwrap_path() else ''}")
    if cfg.isolation not in ("auto", "plain"):
        raise SandboxError(f"sandbox: {cfg.isolation} isolation requested but unavailable: {tried}")
    if cfg.isolation == "auto" and cfg.policy == "required":
        raise SandboxError(
            "sandbox: code rewards need isolation (rewards.sandbox.isolation: required) and no "
            f"isolating backend works here ({tried}). To fix: {INSTALL_HINT}; or set "
            "rewards.sandbox.isolation: best_effort to run programs unisolated (rlimits only)")
    hint = (" (as root, unisolated execution needs SandboxConfig(isolation='plain'))"
            if root and cfg.isolation == "auto" else "")
    raise SandboxError("sandbox: no working isolation mode" + hint + ": " + tried)


def run_python(source: str, stdin: str = "", timeout_s: float = 6.0,
               config: SandboxConfig | None = None) -> RunResult:
    """Run Python `source` with `stdin` in a fresh sandbox; thread-safe.

    Bad code never raises (its RunResult says how it failed); a sandbox that cannot be set up
    raises SandboxError naming the cause.
    """
    cfg = config or SandboxConfig()
    if timeout_s <= 0:
        raise ValueError(f"run_python: timeout_s must be > 0, got {timeout_s}")
    mode, uid_base = isolation_mode(cfg)
    slot = _slots.acquire()
    try:
        uid = None if uid_base is None else (uid_base + slot if uid_base != 65534 else 65534)
        return _run_once(source, stdin, float(timeout_s), cfg, mode, uid)
    finally:
        _slots.release(slot)
