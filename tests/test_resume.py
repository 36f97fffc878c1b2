"""Resumable training: SIGKILL at random moments (incl. during a checkpoint write) and a
corrupted latest checkpoint still end bit-identical to an uninterrupted run."""

import logging
import random
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from trainer_toy import checkpoint_arrays, stable_records, start_train, toy_overrides

from flowrl_jax.checkpoint.manager import TrainCheckpointManager

# --------------------------------------------------------------------------- manager level


def _trees(k: float):
    policy = {"embed": jnp.full((4, 3), k), "layers": {0: {"w": jnp.arange(6.0).reshape(2, 3) * k}}}
    train = {"opt": optax.adamw(1e-3).init(policy), "rng": jax.random.key_data(jax.random.key(7)),
             "step": jnp.asarray(int(k), jnp.int32)}
    return policy, train


def _corrupt(step_dir: Path) -> None:
    """Overwrite every stored file of the policy item with garbage."""
    for f in (step_dir / "policy").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage")


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    m = TrainCheckpointManager(str(d), keep_last=3)
    for s in (1, 2, 3):
        p, t = _trees(float(s))
        m.save(s, p, t, {"step": s, "data_state": {"k": s}})
    m.close()
    _corrupt(d / "3")
    # a half-written step (Orbax's temporary dir, never renamed) must not even be listed
    half = d / "4.orbax-checkpoint-tmp-1234567"
    half.mkdir()
    (half / "policy").mkdir()
    m = TrainCheckpointManager(str(d), keep_last=3)
    assert m.all_steps() == [1, 2, 3]
    like_p, like_t = _trees(0.0)
    with caplog.at_level(logging.WARNING):
        step, policy, train, meta = m.restore_latest(like_p, like_t)
    assert step == 2 and meta == {"step": 2, "data_state": {"k": 2}}
    assert any("step 3" in r.getMessage() and "falling back" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(np.asarray(policy["layers"][0]["w"]), np.arange(6.0).reshape(2, 3) * 2)
    assert int(train["step"]) == 2
    assert jax.tree.structure(train["opt"]) == jax.tree.structure(like_t["opt"])
    # the bad step was moved aside (kept for inspection), so step 3 can be written again
    assert m.all_steps() == [1, 2] and any((tmp_path / "checkpoints.corrupt").iterdir())
    p3, t3 = _trees(3.0)
    m.save(3, p3, t3, {"step": 3})
    m.wait()
    assert m.restore_latest(like_p, like_t)[0] == 3
    m.close()


def test_keep_last_and_keep_every(tmp_path):
    m = TrainCheckpointManager(str(tmp_path / "c"), keep_last=2, keep_every=3)
    for s in range(1, 8):
        p, t = _trees(float(s))
        m.save(s, p, t, {"step": s})
    m.close()
    assert TrainCheckpointManager(str(tmp_path / "c"), 2, 3).all_steps() == [3, 6, 7]


# --------------------------------------------------------------------------- end to end


def _steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _writing(run: Path) -> bool:
    d = run / "checkpoints"
    return d.exists() and any("tmp" in p.name for p in d.iterdir())


def _records(run: Path) -> list:
    f = run / "metrics.jsonl"
    return f.read_text().splitlines() if f.exists() else []


def _wait(cond, proc, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)


@pytest.mark.slow
def test_sigkill_and_restart_is_bit_exact(tmp_path):
    steps = 5
    # the official warm-up over rollout steps (lr 0, 1/3, 2/3, 1, 1 × peak): a resumed run
    # must restore the rollout-step counter too, or its lr and params differ
    ov = toy_overrides("flowrl", steps, **{"optimizer.warmup_unit": "rollout_step",
                                           "optimizer.warmup_steps": 3,
                                           "rollout.backend": "jetstream"})  # the default
    ref = start_train(tmp_path / "ref", ov)  # the uninterrupted run, concurrently
    run = tmp_path / "killed"
    rnd = random.Random(20261125)
    events = []

    # 1) at a random moment of start-up / the first step
    p = start_train(run, ov)
    time.sleep(rnd.uniform(1.0, 8.0))
    _kill(p)
    events.append(("random", _steps(run)))
    # 2) while a checkpoint is being written (Orbax's temporary step dir exists)
    p = start_train(run, ov)
    caught = _wait(lambda: _writing(run), p, 240)
    _kill(p)
    events.append(("during-write" if caught else "missed-write", _steps(run)))
    # 3) a random moment after at least two checkpoints are committed
    p = start_train(run, ov)
    _wait(lambda: len(_steps(run)) >= 2 and not _writing(run), p, 240)
    time.sleep(rnd.uniform(0.0, 0.3))
    _kill(p)
    events.append(("random-late", _steps(run)))
    # 3b) SIGTERM (preemption): a graceful stop with the current step checkpointed
    p = start_train(run, ov)
    n0 = len(_records(run))
    if _wait(lambda: len(_records(run)) > n0, p, 240):
        p.send_signal(signal.SIGTERM)
        assert p.wait(120) == 0
        assert _steps(run)[-1] == len(_records(run))
        events.append(("sigterm", _steps(run)))
    else:
        _kill(p)
    # 4) corrupt the newest complete checkpoint: the restart warns and uses the previous one
    done = _steps(run)
    corrupted = None
    if done and done[-1] < steps and len(done) >= 2:
        corrupted = done[-1]
        _corrupt(run / "checkpoints" / str(corrupted))
    p = start_train(run, ov)
    assert p.wait(300) == 0, (run.parent / "killed.log").read_text()[-3000:]
    assert ref.wait(300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    log_text = (tmp_path / "killed.log").read_text()
    print(events, "corrupted:", corrupted)
    if corrupted is not None:
        assert f"checkpoint step {corrupted}" in log_text and "falling back" in log_text

    a, b = checkpoint_arrays(tmp_path / "ref", steps), checkpoint_arrays(run, steps)
    assert a.keys() == b.keys() and len(a) > 20
    bad = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not bad, f"differs after kill/resume ({events}): {bad[:5]}"
    # the params did train (not a trivially equal pair of untouched inits)
    init = checkpoint_arrays(tmp_path / "ref", steps - 1)
    assert any(not np.array_equal(a[k], init[k]) for k in a if k.startswith("policy"))
    recs_a, recs_b = stable_records(tmp_path / "ref"), stable_records(run)
    assert [r["step"] for r in recs_b] == list(range(1, steps + 1))
    assert recs_a == recs_b
    np.testing.assert_allclose([r["optimizer/lr"] for r in recs_b],
                               [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rtol=1e-6)
