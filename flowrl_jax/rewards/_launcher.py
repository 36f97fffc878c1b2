"""Sandbox launcher: set up isolation, drop privileges, run one program, enforce its deadline.

Run by `sandbox.py` as `python -I -S -B _launcher.py HOST_DIR` (stdlib only, no package import).
In "namespaces" mode it runs as PID 1 of fresh PID/mount/net namespaces (via `unshare`), so its
exit kills every process the program left behind. In "plain" mode (fallback) it becomes a child
subreaper and kills all descendants itself. Exit status: the program's exit code, 128+signal
if it was killed by a signal, 124 on timeout, 125 if the sandbox itself could not be set up.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

EXIT_TIMEOUT = 124
EXIT_SETUP = 125
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or src} on {target}: {os.strerror(err)}")


def _setup_mounts(cfg):
    """Private tmpfs over world-writable dirs; re-expose hidden interpreter dirs read-only."""
    keep = []
    for path in cfg["rebind"]:  # hold the dirs before their hidden ancestors get covered
        keep.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for path in cfg["hide"]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        os.close(fd)
    size = f"size={cfg['tmpfs_mb']}m"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=1777")
    for path in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=1777")


def _kill_descendants(me):
    """Plain mode: SIGKILL every process whose parent is us (orphans are re-parented here)."""
    for _ in range(200):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == me:
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except OSError:
                    pass
        while True:  # reap
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not found:
            return
        time.sleep(0.002)


def _child(cfg, workdir, stdin_path):
    """In the forked child: own process group, stdin, limits, unprivileged ids, exec."""
    try:
        os.setpgid(0, 0)
        fd = os.open(stdin_path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        os.chdir(workdir)
        lim = cfg["limits"]
        for res, value in (
            (resource.RLIMIT_CPU, lim["cpu_s"]),
            (resource.RLIMIT_AS, lim["as_bytes"]),
            (resource.RLIMIT_NPROC, lim["nproc"]),
            (resource.RLIMIT_FSIZE, lim["fsize_bytes"]),
            (resource.RLIMIT_NOFILE, lim["nofile"]),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(res, (value, value))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - report anything, never return into the launcher
        os.write(2, f"sandbox-setup-error: {type(exc).__name__}: {exc}\n".encode())
    os._exit(EXIT_SETUP)


def main():
    host_dir = sys.argv[1]
    with open(os.path.join(host_dir, "config.json")) as f:
        cfg = json.load(f)
    files = {}
    for name in cfg["files"]:
        with open(os.path.join(host_dir, name), "rb") as f:
            files[name] = f.read()
    try:
        if cfg["mode"] == "namespaces":
            _setup_mounts(cfg)
            workdir = "/tmp/sandbox"
        else:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            workdir = os.path.join(host_dir, "work")
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)
        if cfg["uid"] is not None:
            for name in [*files, "."]:
                os.chown(os.path.join(workdir, name), cfg["uid"], cfg["gid"])
    except OSError as exc:
        os.write(2, f"sandbox-setup-error: {exc}\n".encode())
        return EXIT_SETUP

    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        _child(cfg, workdir, os.path.join(workdir, cfg["stdin_file"]))
    deadline = start + cfg["timeout_s"]
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        signal.sigtimedwait([signal.SIGCHLD], min(remaining, 0.5))
    if status is None:  # timeout: kill the program's group, then the rest below
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass
        os.waitpid(pid, 0)
        code = EXIT_TIMEOUT
    elif os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
    if cfg["mode"] != "namespaces":
        _kill_descendants(os.getpid())
    # In namespaces mode returning ends PID 1, and the kernel kills everything left inside.
    return code


if __name__ == "__main__":
    sys.exit(main())
