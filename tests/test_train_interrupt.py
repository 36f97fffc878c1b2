"""Ctrl-C stops training like SIGTERM: a checkpoint of the step in progress and a one-line
message (exit 130); a second Ctrl-C exits at once and leaves every complete checkpoint whole."""

import signal
import time
from pathlib import Path

import pytest
from trainer_toy import checkpoint_arrays, start_train, toy_overrides


def _steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _records(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _wait(cond, proc, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        assert proc.poll() is None, "the run ended before the condition held"
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_step_and_says_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    # no periodic checkpoint: the only one is the stop's
    p = start_train(run, toy_overrides("flowrl", 200, **{"trainer.checkpoint_every": 1000}))
    _wait(lambda: _records(run) >= 1, p, 300)
    p.send_signal(signal.SIGINT)
    assert p.wait(120) == 130
    log = Path(str(run) + ".log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    n = _records(run)
    assert _steps(run) == [n] and 1 <= n < 200
    last = [ln for ln in log.splitlines() if ln.strip()][-1]
    assert last.startswith("flowrl-jax train: interrupted: stopped after step ") and f"step {n} " in last
    assert len(checkpoint_arrays(run, n)) > 20  # complete and readable


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_keeping_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    p = start_train(run, toy_overrides("flowrl", 200))  # a checkpoint every step, keep 2
    _wait(lambda: len(_steps(run)) >= 1 and _records(run) >= 2, p, 300)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    assert p.wait(60) == 130
    assert time.time() - t0 < 30
    log = Path(str(run) + ".log").read_text()
    assert "second Ctrl-C: exiting now" in log and "Traceback" not in log
    steps = _steps(run)
    assert steps
    for s in steps:  # every listed step is whole
        assert len(checkpoint_arrays(run, s)) > 20
