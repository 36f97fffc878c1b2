"""Math-Verify evaluation scorer (SPEC §3): gold wrapped in \\boxed{}, 0/1, hard per-call timeout.

Math-Verify times itself out with SIGALRM, which only works in a main thread, and some
sympy operations ignore it anyway. So every call runs in a persistent worker process
(`_mv_worker.py`); the caller waits on a pipe with a wall-clock deadline and, if it passes,
kills and replaces the worker and scores 0.0 with a logged warning. Works from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = str(Path(__file__).with_name("_mv_worker.py"))
_STARTUP_TIMEOUT_S = 60.0


def boxed_gold(ground_truth: str) -> str:
    """Wrap a gold answer in \\boxed{} unless it already is."""
    gt = str(ground_truth).strip()
    return gt if gt.startswith("\\boxed{") else "\\boxed{" + gt + "}"


class _Worker:
    """One long-lived Math-Verify process speaking JSON lines over pipes."""

    def __init__(self, argv: list[str]):
        self._argv = argv
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True, process_group=0,
        )
        self._buf = b""
        ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        if ready is None:
            self.kill()
            raise RuntimeError(f"math-verify worker did not start: {' '.join(self._argv)}")

    def _read_line(self, deadline: float) -> bytes | None:
        """One response line, or None if the deadline passes or the worker dies."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def call(self, request: dict, timeout_s: float) -> dict | None:
        """Send one request; None on timeout or worker death (the worker is then killed)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def kill(self) -> None:
        """Kill the worker (and anything it spawned) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathVerifyScorer:
    """Thread-safe Math-Verify scorer backed by up to `num_workers` persistent processes."""

    def __init__(self, num_workers: int = 1, timeout_s: float = 10.0, inner_timeout_s: int = 5,
                 worker_argv: list[str] | None = None):
        if num_workers < 1:
            raise ValueError(f"MathVerifyScorer: num_workers must be >= 1, got {num_workers}")
        self.timeout_s = float(timeout_s)
        argv = worker_argv or [sys.executable, "-B", _WORKER_SCRIPT, str(int(inner_timeout_s))]
        self._argv = list(argv)
        self._num_workers = num_workers
        self._make_workers()
        self.num_timeouts = 0

    def _make_workers(self) -> None:
        # Workers start lazily on first use; the pid guards against use after os.fork(),
        # where parent and child would otherwise share the same worker pipes.
        self._pid = os.getpid()
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._workers = [_Worker(list(self._argv)) for _ in range(self._num_workers)]
        for w in self._workers:
            self._idle.put(w)

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if Math-Verify accepts `response` against boxed `ground_truth`, else 0.0."""
        request = {"gold": boxed_gold(ground_truth), "pred": str(response)}
        if os.getpid() != self._pid:  # forked child: never touch the parent's workers
            self._make_workers()
        worker = self._idle.get()
        try:
            result = worker.call(request, self.timeout_s)
        finally:
            self._idle.put(worker)
        if result is None:
            self.num_timeouts += 1
            logger.warning("math-verify timed out after %.1fs (or its worker died); scoring 0.0 "
                           "(gold=%r, response tail=%r)", self.timeout_s, request["gold"][:80],
                           request["pred"][-120:])
            return 0.0
        return float(result.get("score", 0.0))

    def close(self) -> None:
        """Stop all worker processes (only those this process started)."""
        if os.getpid() != self._pid:
            return
        for w in self._workers:
            w.kill()


_default: MathVerifyScorer | None = None
_default_lock = threading.Lock()


def default_scorer() -> MathVerifyScorer:
    """Process-wide scorer used by `score("math_verify", ...)` outside a RewardPool."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifyScorer(num_workers=max(1, min(4, os.cpu_count() or 1)))
        return _default


def math_verify_score(response: str, ground_truth: str) -> float:
    """Math-Verify 0/1 score with the process-wide default scorer."""
    return default_scorer().score(response, ground_truth)
