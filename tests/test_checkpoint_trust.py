"""Checkpoints are never lost: a config mismatch is a ConfigError that touches nothing, a
transient read error is retried then reported, and only a corrupt step is set aside."""

import errno
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest

from flowrl_jax.checkpoint import manager as manager_mod
from flowrl_jax.checkpoint.manager import TrainCheckpointManager
from flowrl_jax.errors import CheckpointError, ConfigError


def _trees(k: float, width: int = 3, dtype=jnp.float32):
    policy = {"embed": jnp.full((4, width), k, dtype),
              "layers": {0: {"w": (jnp.arange(2.0 * width).reshape(2, width) * k).astype(dtype)}}}
    train = {"opt": optax.adamw(1e-3).init(policy), "step": jnp.asarray(int(k), jnp.int32)}
    return policy, train


@pytest.fixture
def saved(tmp_path) -> Path:
    d = tmp_path / "checkpoints"
    m = TrainCheckpointManager(str(d), keep_last=3)
    for s in (1, 2):
        p, t = _trees(float(s))
        m.save(s, p, t, {"step": s})
    m.close()
    return d


def _entries(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d.parent)) for p in d.parent.rglob("*"))


def test_other_shapes_are_a_config_error_naming_each_key(saved):
    before = _entries(saved)
    m = TrainCheckpointManager(str(saved))
    with pytest.raises(ConfigError) as ei:
        m.restore_latest(*_trees(0.0, width=5))
    msg = str(ei.value)
    assert "\n" not in msg and "step 2" in msg
    assert "'embed' stored (4, 3), config (4, 5)" in msg
    assert "'layers/0/w' stored (2, 3), config (2, 5)" in msg
    m.close()
    assert _entries(saved) == before  # nothing moved, nothing written
    assert not (saved.parent / "checkpoints.corrupt").exists()


def test_other_dtype_and_missing_keys_are_config_errors(saved):
    m = TrainCheckpointManager(str(saved))
    with pytest.raises(ConfigError, match=r"'embed' stored float32, config bfloat16"):
        m.restore_latest(*_trees(0.0, dtype=jnp.bfloat16))
    p, t = _trees(0.0)
    t["extra"] = jnp.zeros(2)
    with pytest.raises(ConfigError, match=r"train 'extra' missing from the checkpoint"):
        m.restore_latest(p, t)
    m.close()
    assert TrainCheckpointManager(str(saved)).all_steps() == [1, 2]


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), MemoryError()])
def test_transient_read_errors_are_retried_then_reported_never_set_aside(saved, monkeypatch, exc):
    monkeypatch.setattr(manager_mod, "RETRY_DELAY_S", 0.0)
    m = TrainCheckpointManager(str(saved))
    calls = []

    def failing(step, *a):
        calls.append(step)
        raise exc

    monkeypatch.setattr(m, "restore_step", failing)
    with pytest.raises(CheckpointError, match=r"step 2 .* failed 3 times .*left in place"):
        m.restore_latest(*_trees(0.0))
    assert calls == [2, 2, 2]
    assert m.all_steps() == [1, 2] and not (saved.parent / "checkpoints.corrupt").exists()
    m.close()


def test_a_transient_error_that_passes_restores_the_newest_step(saved, monkeypatch):
    monkeypatch.setattr(manager_mod, "RETRY_DELAY_S", 0.0)
    m = TrainCheckpointManager(str(saved))
    real, fails = m.restore_step, [MemoryError()]

    def flaky(*a):
        if fails:
            raise fails.pop()
        return real(*a)

    monkeypatch.setattr(m, "restore_step", flaky)
    step, policy, _, _ = m.restore_latest(*_trees(0.0))
    assert step == 2 and float(policy["embed"][0, 0]) == 2.0
    m.close()


def test_missing_files_set_only_that_step_aside(saved):
    data = [f for f in (saved / "2" / "policy").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data
    for f in data:  # the array data files of step 2 are gone
        f.unlink()
    m = TrainCheckpointManager(str(saved))
    step, policy, _, _ = m.restore_latest(*_trees(0.0))
    assert step == 1 and float(policy["embed"][0, 0]) == 1.0
    assert m.all_steps() == [1] and len(m.set_aside()) == 1 and m.set_aside()[0].startswith("2-")
    m.close()


def test_every_step_corrupt_says_where_they_went_and_how_to_start_over(saved):
    for s in ("1", "2"):
        (saved / s / "meta" / "metadata").write_text("{not json")
    m = TrainCheckpointManager(str(saved))
    with pytest.raises(CheckpointError) as ei:
        m.restore_latest(*_trees(0.0))
    msg = str(ei.value)
    assert "checkpoints.corrupt" in msg and "--no-resume" in msg and "new --out" in msg
    assert len(m.set_aside()) == 2
    m.close()


def test_is_transient():
    assert manager_mod.is_transient(OSError(errno.EIO, "io"))
    assert manager_mod.is_transient(MemoryError())
    assert manager_mod.is_transient(ValueError("UNAVAILABLE: try again"))
    assert not manager_mod.is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not manager_mod.is_transient(ValueError("DATA_LOSS: truncated"))
    assert not manager_mod.is_transient(ConfigError("timed out"))


# --------------------------------------------------------------------------- the case


def _tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))


@pytest.mark.slow
def test_a_changed_architecture_on_resume_keeps_every_checkpoint(tmp_path, capsys):
    from flowrl_jax import cli

    run = tmp_path / "RUN"
    cmd = ["train", "--config", "configs/demo.yaml", "--out", str(run), "--no-console",
           "trainer.steps=6", "trainer.checkpoint_every=3"]
    assert cli.main(cmd) == 0
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["3", "6"]
    files, metrics = _tree(run), (run / "metrics.jsonl").read_text()
    assert len(metrics.splitlines()) == 6
    capsys.readouterr()

    assert cli.main(cmd + ["model.arch.intermediate_size=128"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.arch.intermediate_size: saved 64, now 128" in err
    assert "Traceback" not in err
    assert _tree(run) == files and not (run / "checkpoints.corrupt").exists()
    assert (run / "metrics.jsonl").read_text() == metrics

    # the original command resumes from step 6; one more step continues the same record
    assert cli.main(cmd[:-2] + ["trainer.steps=7", "trainer.checkpoint_every=3"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7 and "\n".join(lines[:6]) + "\n" == metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "6", "7"]  # keep_last: 2


def test_a_fresh_start_is_refused_over_set_aside_checkpoints(tmp_path):
    from flowrl_jax.checkpoint.run import RunCheckpoint
    from flowrl_jax.config import load_config

    cfg = load_config("configs/demo.yaml")
    run = tmp_path / "RUN"
    (run / "checkpoints.corrupt" / "6-1").mkdir(parents=True)
    rc = RunCheckpoint(run, cfg)
    with pytest.raises(CheckpointError, match=r"set aside .*6-1.*--no-resume"):
        rc.restore(object())
    assert rc.restore(object(), allow_resume=False) is None  # --no-resume: start over here
    (run / "checkpoints" / "9").mkdir()  # a step dir Orbax cannot list
    with pytest.raises(CheckpointError, match=r"step directories \['9'\]"):
        rc.restore(object(), allow_resume=False)
    rc.close()
