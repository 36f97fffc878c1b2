"""Trainer building blocks: rollout → padded batch, mini-batch cut, seeds, metrics log."""

import json

import numpy as np
import pytest

from flowrl_jax.rl.metrics_log import MetricsLogger
from flowrl_jax.run_files import read_metrics
from flowrl_jax.rl.metrics import mean_over_updates
from flowrl_jax.rl.rollout_batch import (RolloutBatch, bucket, build_rollout_batch, minibatches,
                                         pad_prompts)
from flowrl_jax.rl.trainer import step_seed


def test_bucket_picks_the_smallest_fitting_length():
    assert bucket(1, (8, 16, 32), 20) == 8
    assert bucket(9, (8, 16, 32), 20) == 16
    assert bucket(17, (8, 16, 32), 20) == 20  # the cap itself is a bucket
    with pytest.raises(ValueError, match="exceeds"):
        bucket(21, (8, 16), 20)


def test_rollout_batch_layout_by_hand():
    prompts = [[5, 6, 7], [9]]
    pidx = np.array([0, 0, 1, 1])
    tokens = np.array([[11, 12, 2, 0], [13, 0, 0, 0], [14, 15, 16, 17], [18, 19, 0, 0]])
    lengths = np.array([3, 1, 4, 2])
    b = build_rollout_batch(prompts, pidx, tokens, lengths, np.array([1, -1, 1, 1.0]), 4, 4,
                            sampler_logp=np.full((4, 4), -0.5, np.float32), pad_id=0)
    np.testing.assert_array_equal(b.prompt_ids, [[0, 5, 6, 7], [0, 5, 6, 7], [0, 0, 0, 9],
                                                 [0, 0, 0, 9]])
    np.testing.assert_array_equal(b.prompt_mask, [[0, 1, 1, 1]] * 2 + [[0, 0, 0, 1]] * 2)
    np.testing.assert_array_equal(b.response_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1],
                                                    [1, 1, 0, 0]])
    np.testing.assert_array_equal(b.response_ids[1], [13, 0, 0, 0])
    np.testing.assert_array_equal(b.group_ids, pidx)
    np.testing.assert_array_equal(b.sampler_logp[3], [-0.5, -0.5, 0, 0])
    assert b.prompt_len == 4 and b.old_logp is None
    mb = b.model_inputs()
    assert sorted(mb) == ["attention_mask", "input_ids", "response_mask"]
    np.testing.assert_array_equal(mb["input_ids"][0], [0, 5, 6, 7, 11, 12, 2, 0])
    np.testing.assert_array_equal(mb["attention_mask"][3], [0, 0, 0, 1, 1, 1, 0, 0])
    ids, mask = pad_prompts([[1, 2, 3, 4, 5]], 3)  # left truncation keeps the tail
    np.testing.assert_array_equal(ids, [[3, 4, 5]])


def test_minibatches_cover_every_row_once_and_pad_the_last():
    n, p = 10, 3
    rmask = (np.arange(16)[None] < (np.arange(n) % 5 + 1)[:, None]).astype(np.int32)
    ids = np.arange(n * (p + 16), dtype=np.int32).reshape(n, p + 16)
    batch = RolloutBatch(input_ids=ids, attention_mask=np.ones_like(ids), response_mask=rmask,
                         group_ids=np.arange(n, dtype=np.int32),
                         rewards=np.arange(n, dtype=np.float32), seq_mask=np.ones(n, np.int32),
                         old_logp=rmask * 0.5)
    mbs = list(minibatches(batch, 4, np.random.default_rng(0), (2, 4, 8), 16))
    assert [m.rows for m in mbs] == [4, 4, 4]
    real = np.concatenate([m.rewards[m.seq_mask > 0] for m in mbs])
    assert sorted(real.tolist()) == list(range(n))
    assert int(mbs[-1].seq_mask.sum()) == 2 and not mbs[-1].response_mask[2:].any()
    for m in mbs:  # cut to the smallest bucket holding the longest response
        longest = int(m.response_mask.sum(1).max())
        r = bucket(longest, (2, 4, 8), 16)
        assert m.response_mask.shape[1] == r and m.old_logp.shape[1] == r
        assert m.input_ids.shape[1] == m.attention_mask.shape[1] == p + r and m.prompt_len == p
        for i, row in enumerate(m.group_ids[:int(m.seq_mask.sum())]):  # the rows' own tokens
            np.testing.assert_array_equal(m.input_ids[i], ids[row, :p + r])
    again = list(minibatches(batch, 4, np.random.default_rng(0), (2, 4, 8), 16))
    assert all(np.array_equal(a.rewards, b.rewards) for a, b in zip(mbs, again))


def test_rollout_batch_refuses_unknown_fields():
    b = build_rollout_batch([[1]], np.array([0]), np.array([[2]]), np.array([1]), np.array([1.0]),
                            1, 1)
    with pytest.raises(KeyError, match="no field 'advantage'"):
        b.with_arrays({"advantage": np.zeros((1, 1))})
    assert b.with_arrays({"rhat": np.ones(1)}).train_inputs()["rhat"].tolist() == [1.0]


def test_step_seeds_depend_only_on_seed_step_salt():
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)
    seeds = {step_seed(s, t, k) for s in range(3) for t in range(20) for k in range(3)}
    assert len(seeds) == 180 and all(0 <= x < 2**31 for x in seeds)


def test_mean_metrics_renames_and_averages():
    out = mean_over_updates([{"loss": 1.0, "kl_ref": 0.1, "step": 1, "num_seqs": 8},
                         {"loss": 3.0, "kl_ref": 0.3, "step": 2, "num_seqs": 8}])
    assert out == pytest.approx({"loss/total": 2.0, "kl/ref": 0.2, "optimizer/step": 1.5})


def test_metrics_logger_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, console=False)
    for s in (1, 2, 3):
        log.log(s, {"reward/mean": float(s), "x": np.float32(0.5)})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # a run killed after step 3 but checkpointed at step 2 resumes with the step-2 history
    log = MetricsLogger(tmp_path, console=False, history=read_metrics(tmp_path)[:2], start_step=2)
    log.log(3, {"reward/mean": 30.0})
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward/mean"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert any((tmp_path / "tb").iterdir())
