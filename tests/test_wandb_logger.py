"""The optional Weights & Biases logger (`trainer.loggers: [..., wandb]`), in offline mode."""

from __future__ import annotations

import importlib.util
import json

import pytest
from _wandb_offline import history

from flowrl_jax.config import ConfigError, load_config
from flowrl_jax.rl.metrics_log import MetricsLogger
from flowrl_jax.rl.metrics_wandb import ID_FILE


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def test_offline_run_holds_the_logged_metrics_and_resumes_the_same_run(tmp_path, offline):
    out = tmp_path / "run"
    log = MetricsLogger(out, tensorboard=False, console=False, wandb_project="flowrl-test",
                        run_config={"seed": 3})
    log.log(1, {"reward/mean": 0.25, "loss/total": 1.5, "note": "text", "bad": float("nan")})
    log.log(2, {"reward/mean": 0.75, "loss/total": 0.5})
    log.close()
    run_id = (out / ID_FILE).read_text().strip()
    # resumed after step 2: the same W&B run, steps already sent are not sent again
    log = MetricsLogger(out, tensorboard=False, console=False, wandb_project="flowrl-test",
                        history=[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
                        start_step=2)
    log.log(3, {"reward/mean": 1.0, "loss/total": 0.25})
    log.close()
    assert (out / ID_FILE).read_text().strip() == run_id
    runs = sorted(offline.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)
    rows = [{k: v for k, v in r.items() if not k.startswith("_") or k == "_step"}
            for r in history(offline)]
    assert rows == [{"_step": 1, "reward/mean": 0.25, "loss/total": 1.5},
                    {"_step": 2, "reward/mean": 0.75, "loss/total": 0.5},
                    {"_step": 3, "reward/mean": 1.0, "loss/total": 0.25}]


def test_loggers_config():
    cfg = load_config(None, ["trainer.loggers=[jsonl,tensorboard,wandb]"])
    assert cfg.trainer.loggers == ("jsonl", "tensorboard", "wandb")
    assert load_config(None, []).trainer.loggers == ("jsonl", "tensorboard")
    with pytest.raises(ConfigError, match=r"trainer\.loggers.*must include jsonl"):
        load_config(None, ["trainer.loggers=[tensorboard]"])
    with pytest.raises(ConfigError, match=r"trainer\.loggers\[1\].*'mlflow'"):
        load_config(None, ["trainer.loggers=[jsonl,mlflow]"])


def test_missing_wandb_package_is_a_config_error_at_load(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # what trainer.loggers' check asks
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"trainer\.loggers: lists wandb but the wandb package "
                                          r"is not installed \(pip install 'flowrl-jax\[wandb\]'\)"):
        load_config(None, ["trainer.loggers=[jsonl,wandb]"])
    load_config(None, ["trainer.loggers=[jsonl]"])  # without wandb nothing is asked of it
