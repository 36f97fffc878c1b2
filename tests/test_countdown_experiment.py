"""`flowrl-jax experiment countdown` end to end at a tiny size: the outputs and their keys."""

import json

import pytest

from flowrl_jax.cli import main
from flowrl_jax.experiments.countdown import runs
from flowrl_jax.experiments.countdown.report import PLOTS

FIGURES = ("accuracy_avg16", "distinct_correct_per_problem", "mass_on_valid",
           "kl_target_policy", "answers_covered", "pass_at_k", "seen", "reward_curve")


def test_unavailable_switch_is_detected_by_the_config_loader():
    assert runs.unavailable_reason("countdown", ["algo.no_such_switch=1"]) is not None
    assert runs.unavailable_reason("countdown", ["algo.beta=5"]) is None


@pytest.mark.slow
def test_experiment_countdown_tiny(tmp_path, monkeypatch):
    # a switch no build has: reported, not run, and the rest of the experiment goes on
    monkeypatch.setitem(runs.ABLATION_RUNS, "bogus", ["algo.name=flowrl", "algo.no_such=1"])
    out = tmp_path / "cd"
    rc = main(["experiment", "countdown", "--out", str(out), "--seeds", "1",
               "--runs", "flowrl,grpo,bogus", "trainer.steps=2", "trainer.checkpoint_every=2",
               "task.sft_steps=3", "task.num_heldout=4", "task.eval_samples=4"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"runs", "meta"}
    assert list(summary["runs"]) == ["flowrl", "grpo", "bogus"]
    assert summary["runs"]["bogus"]["status"] == runs.UNAVAILABLE
    assert "algo.no_such" in summary["runs"]["bogus"]["reason"]
    for name in ("flowrl", "grpo"):
        r = summary["runs"][name]
        assert r["status"] == "ok" and r["seeds"] == [0]
        for key in FIGURES:
            assert key in r, (name, key)
        assert sorted(r["pass_at_k"], key=int) == ["1", "2", "3", "4"]
        assert len(r["accuracy_avg16"]["per_seed"]) == 1
        assert len(r["reward_curve"]["per_seed"][0]) == 2
        assert (out / "runs" / name / "seed0" / "checkpoints").is_dir()
    assert summary["meta"]["num_heldout_problems"] == 4
    for png in PLOTS:
        assert (out / png).stat().st_size > 5_000, png
    report = (out / "report.md").read_text()
    assert "| flowrl |" in report and runs.UNAVAILABLE in report
    details = json.loads((out / "details.json").read_text())
    assert len(details["per_answer"]["flowrl"][0]["heldout"]) == 4
