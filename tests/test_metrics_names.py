"""One naming style in metrics.jsonl (`group/name`, lower_snake), and runs written with the
older bare names read under today's names everywhere (run_files.METRIC_ALIASES)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from flowrl_jax.config import load_config
from flowrl_jax.eval.report import load_run
from flowrl_jax.rl.metrics import KEY_STYLE, RENAMED, mean_over_updates, step_metrics
from flowrl_jax.rl.metrics_log import DISPLAY, MetricsLogger
from flowrl_jax.run_files import METRIC_ALIASES, canonical_metrics, read_metrics

# A metrics.jsonl line as runs before the naming pass wrote it (FlowRL + PPO keys mixed).
OLD = {"step": 1, "reward/mean": 0.5, "accuracy": 0.25, "accuracy/gsm8k": 0.5, "entropy": 1.5,
       "loss": 0.75, "log_z_mean": 0.1, "w_mean": 1.0, "clip_frac": 0.0, "delta_mean": 0.2,
       "pg_clip_frac": 0.1, "vf_loss": 0.3, "value_mean": -0.1, "grad_norm_policy": 2.0,
       "grad_norm_z": 0.5, "kl/ref": 0.01, "optimizer/grad_norm": 2.1, "entropy/train": 1.4,
       "val/aime24/accuracy": 0.1, "reward/gsm8k/mean": 0.5, "time/step": 3.0}


def test_old_metrics_file_reads_with_new_names(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(OLD) + "\n" + json.dumps({**OLD, "step": 2}) + "\n")
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2]
    new = recs[0]
    assert new["reward/accuracy"] == 0.25 and new["reward/gsm8k/accuracy"] == 0.5
    assert new["entropy/rollout"] == 1.5 and new["entropy/train"] == 1.4
    assert new["loss/total"] == 0.75 and new["loss/value"] == 0.3 and new["value/mean"] == -0.1
    assert new["flowrl/log_z_mean"] == 0.1 and new["flowrl/clip_frac"] == 0.0
    assert new["policy/clip_frac"] == 0.1
    assert new["optimizer/grad_norm_policy"] == 2.0 and new["optimizer/grad_norm_z"] == 0.5
    assert new["val/aime24/accuracy"] == 0.1 and new["reward/gsm8k/mean"] == 0.5  # unchanged
    off = [k for k in new if k != "step" and not KEY_STYLE.fullmatch(k)]
    assert off == [] and len(new) == len(OLD)
    # report reads old runs through the same table
    assert load_run(run).metrics[0]["reward/accuracy"] == 0.25


def test_new_name_wins_over_an_old_alias_in_one_record():
    assert canonical_metrics({"loss": 1.0, "loss/total": 2.0}) == {"loss/total": 2.0}


def test_resumed_history_continues_under_new_names(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, console=False, history=[OLD], start_step=1)
    log.log(2, {"loss/total": 0.5})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss" not in lines[0] and lines[0]["loss/total"] == 0.75 and lines[1]["loss/total"] == 0.5


def test_every_reported_name_has_the_style():
    # every train-step metric an algorithm returns is renamed into the style...
    names = [*RENAMED, "grad_norm_policy", "grad_norm_critic", "grad_norm_z"]
    reported = mean_over_updates([{k: np.float32(1.0) for k in names}])
    assert sorted(k for k in reported if not KEY_STYLE.fullmatch(k)) == []
    # ...and a new one that is not fails this style check (as the trainer test's does)
    assert not KEY_STYLE.fullmatch(next(iter(mean_over_updates([{"new_thing": 1.0}]))))
    for bad in ("accuracy", "Loss/total", "loss/", "loss/Total", "loss total/x"):
        assert not KEY_STYLE.fullmatch(bad), bad
    for good in ("reward/accuracy", "reward/my-set.v2/accuracy", "val/aime24/accuracy"):
        assert KEY_STYLE.fullmatch(good), good
    assert set(METRIC_ALIASES.values()) <= {*RENAMED.values(), "reward/accuracy", "entropy/rollout"}
    assert all(KEY_STYLE.fullmatch(k) for k, _ in DISPLAY)

    # the step-level metrics (rollout, rewards, timings) of a tiny synthetic step
    cfg = load_config(None, ["rollout.samples_per_prompt=2"])
    batch = SimpleNamespace(data_source=["gsm8k", "math_dapo"], prompts=[[1, 2], [3]])
    ro = SimpleNamespace(prompt_index=np.array([0, 0, 1, 1]), lengths=np.array([3, 4, 2, 5]),
                         finish_reasons=["stop", "length", "stop", "stop"])
    mask = np.ones((4, 5), np.float32)
    data = SimpleNamespace(rhat=np.zeros(4), response_mask=mask, entropy=mask, sampler_logp=mask,
                           old_logp=mask, prompt_mask=np.ones((4, 2)))
    m = step_metrics(cfg, batch, ro, np.array([1.0, 0.0, 0.0, 1.0]), data, [{"loss": 1.0}],
                     {"sampling": 1.0, "reward": 0.5}, skipped_total=0, n_params=10,
                     uses_ref=True, peak_flops=1e12, device_count=1)
    assert sorted(k for k in m if not KEY_STYLE.fullmatch(k)) == []
    assert m["reward/gsm8k/accuracy"] == 0.5 and m["loss/total"] == 1.0
