"""Sandbox launcher: set up isolation, drop privileges, run one program, enforce its deadline.

Run by `sandbox.py` as `python -I -S -B _launcher.py HOST_DIR` (stdlib only, no package import).
In "namespaces" mode it runs as PID 1 of fresh PID/mount/net namespaces (via `unshare`), so its
exit kills every process the program left behind. In "bwrap" mode bubblewrap has built the
namespaces and the filesystem view already; the launcher's exit ends bwrap's PID namespace the
same way. In "plain" mode (fallback) it becomes a child subreaper and kills all descendants
itself. Exit status: the program's exit code, 128+signal
if it was killed by a signal, 124 on timeout, 125 if the sandbox itself could not be set up.
The host learns about set-up failures, and that the program started, from the status pipe
(config "status_fd"): the program cannot write to it (closed before it runs), unlike its exit
code or stderr, so it cannot fake a set-up failure or hide one.
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
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
_libc = ctypes.CDLL(None, use_errno=True)

# seccomp deny-list: namespace/mount/kernel-extension/introspection syscalls a test program
# never needs; each is a known kernel attack surface (e.g. unprivileged user namespaces).
_DENY = ("unshare setns mount umount2 pivot_root chroot ptrace process_vm_readv process_vm_writev "
         "keyctl add_key request_key bpf perf_event_open io_uring_setup io_uring_enter "
         "io_uring_register userfaultfd kexec_load kexec_file_load init_module finit_module "
         "delete_module reboot swapon swapoff acct syslog open_by_handle_at name_to_handle_at "
         "fsopen fsmount move_mount open_tree fspick mount_setattr").split()
_SYSCALLS = {  # (AUDIT_ARCH, numbers in _DENY order, clone, clone3)
    "x86_64": (0xC000003E, (272, 308, 165, 166, 155, 161, 101, 310, 311, 250, 248, 249, 321, 298,
                            425, 426, 427, 323, 246, 320, 175, 313, 176, 169, 167, 168, 163, 103,
                            304, 303, 430, 432, 429, 428, 433, 442), 56, 435),
    "aarch64": (0xC00000B7, (97, 268, 40, 39, 41, 51, 117, 270, 271, 219, 217, 218, 280, 241,
                             425, 426, 427, 282, 104, 294, 105, 273, 106, 142, 224, 225, 89, 116,
                             265, 264, 430, 432, 429, 428, 433, 442), 220, 435),
}
_CLONE_NEW_MASK = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _seccomp_program(machine):
    """Classic-BPF filter: deny-listed syscalls -> EPERM, clone3 -> ENOSYS, clone(CLONE_NEW*) -> EPERM."""
    arch, deny, nr_clone, nr_clone3 = _SYSCALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    code = [(ld, 0, 0, 4), (jeq, 0, "kill", arch), (ld, 0, 0, 0)]
    if machine == "x86_64":
        code.append((jge, "deny", 0, 0x40000000))  # x32 ABI numbers
    code += [(jeq, "deny", 0, nr) for nr in deny]
    code += [(jeq, "enosys", 0, nr_clone3), (jeq, 0, "allow", nr_clone),
             (ld, 0, 0, 16), (jset, "deny", "allow", _CLONE_NEW_MASK)]
    labels = {"allow": len(code), "deny": len(code) + 1, "enosys": len(code) + 2, "kill": len(code) + 3}
    code += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x00050000 | 38),
             (ret, 0, 0, 0x80000000)]
    out = []
    for i, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((op, jt, jf, k))
    return out


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _install_seccomp():
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        return  # the host logs that seccomp is unavailable on this architecture
    prog = _seccomp_program(machine)
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), arr)
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, "seccomp: " + os.strerror(err))


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or src} on {target}: {os.strerror(err)}")


def _setup_mounts(cfg):
    """Private tmpfs over world-writable dirs, empty tmpfs over hidden dirs, then the
    interpreter's dirs bound back read-only on top of both (wherever they live)."""
    keep = []
    for path in cfg["rebind"]:  # hold the dirs before anything covers them
        try:
            keep.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
        except OSError as exc:
            raise OSError(exc.errno, f"interpreter dir {path}: {exc.strerror}") from None
    for path in cfg["hide"]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["masked"]:
        if path == "/tmp":
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=1777")
        elif os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=1777")
    os.umask(0o022)  # mount points made below must be traversable by the program's uid
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


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


def _run_inproc(cfg, setup_fd):
    """Run the program in this (forked, already unprivileged) interpreter: saves a Python start.

    Mirrors `python -B -S main.py`: script dir and PYTHONPATH first on sys.path, the program's
    environment, SystemExit/uncaught-exception exit codes, atexit handlers, flushed stdio.
    """
    import atexit
    import runpy
    import traceback

    os.close(setup_fd)  # set-up done: from here on, failures are the program's
    os.environ.clear()
    os.environ.update(cfg["env"])
    script = cfg["argv"][-1]
    sys.path[:0] = [os.getcwd(), *cfg["pythonpath"]]
    sys.argv = [script]
    sys.dont_write_bytecode = True
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - like the interpreter: print the traceback, exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            code = code or 120  # like Python when flushing stdout fails at exit
    os._exit(code)


def _child(cfg, workdir, stdin_path, setup_fd):
    """In the forked child: own process group, stdin, limits, unprivileged ids, exec.

    `setup_fd` (close-on-exec) carries a set-up failure back to the launcher; it closes when
    the program starts (exec or in-process), so the program cannot write to it.
    """
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
        if cfg.get("seccomp"):
            _install_seccomp()
        if cfg.get("inproc"):
            _run_inproc(cfg, setup_fd)  # never returns
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - report anything, never return into the launcher
        try:
            os.write(setup_fd, f"{type(exc).__name__}: {exc}".encode()[:2000])
        except OSError:
            pass
    os._exit(EXIT_SETUP)


def _read_until_eof(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)


def main():
    host_dir = sys.argv[1]
    with open(os.path.join(host_dir, "config.json")) as f:
        cfg = json.load(f)
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # never handed to the program

    def report(message):
        try:
            os.write(status_fd, message.encode()[:3000])
        except OSError:
            pass

    files = {}
    for name in cfg["files"]:
        with open(os.path.join(host_dir, name), "rb") as f:
            files[name] = f.read()
    try:
        if cfg["mode"] in ("namespaces", "bwrap"):
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
    except Exception as exc:  # noqa: BLE001 - any failure here is the sandbox's, not the program's
        report(f"setup-error: {type(exc).__name__}: {exc}\n")
        return EXIT_SETUP

    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    setup_r, setup_w = os.pipe()  # close-on-exec (Python's default)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        os.close(setup_r)
        os.close(status_fd)
        _child(cfg, workdir, os.path.join(workdir, cfg["stdin_file"]), setup_w)
    os.close(setup_w)
    # a program under the launcher's own uid (bwrap without root, plain) must not reach its
    # memory through /proc/<pid>/mem: non-dumpable processes refuse same-uid ptrace access
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    failure = _read_until_eof(setup_r)  # EOF as soon as the program starts
    os.close(setup_r)
    if failure:
        os.waitpid(pid, 0)
        report(f"setup-error: {failure}\n")
        return EXIT_SETUP
    report("started\n")
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
    if cfg["mode"] == "plain":
        _kill_descendants(os.getpid())
    # Otherwise returning ends the PID namespace, and the kernel kills everything left inside.
    return code


if __name__ == "__main__":
    sys.exit(main())
