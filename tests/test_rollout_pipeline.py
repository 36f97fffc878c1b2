"""The Grain rollout pipeline: its stages against plain references, and the trainer through
it bit-identical to the NumPy path (`trainer.rollout_pipeline: numpy`) on CPU."""

import json

import numpy as np
import pytest
from trainer_toy import ToyTask, checkpoint_arrays, stable_records, start_train, toy_overrides

from flowrl_jax.config import ConfigError, load_config
from flowrl_jax.rl.rollout_batch import build_rollout_batch, minibatches
from flowrl_jax.rl.rollout_pipeline import (GroupByPrompt, MiniBatches, RolloutPipeline, Sample,
                                            rewards_by_row, scored_samples)
from flowrl_jax.rl.task import PromptBatch
from flowrl_jax.sampling.results import Rollout


def _rollout(prompts: int, g: int, seed: int = 0) -> Rollout:
    """A fake sampler rollout, rows in a shuffled (completion) order."""
    rng = np.random.default_rng(seed)
    pairs = [(p, s) for p in range(prompts) for s in range(g)]
    order = rng.permutation(len(pairs))
    pi = np.asarray([pairs[i][0] for i in order], np.int32)
    si = np.asarray([pairs[i][1] for i in order], np.int32)
    lengths = rng.integers(1, 7, len(pairs)).astype(np.int32)
    tokens = rng.integers(3, 20, (len(pairs), 6)).astype(np.int32)
    tokens[np.arange(6)[None, :] >= lengths[:, None]] = 0
    return Rollout(pi, si, tokens, np.zeros(tokens.shape, np.float32), lengths,
                   ["stop"] * len(pairs))


def _batch(prompts: int) -> PromptBatch:
    return PromptBatch([[5 + p, 6] for p in range(prompts)], [3 + p % 16 for p in range(prompts)],
                       ["toy"] * prompts)


def test_reward_and_regroup_stages_match_scoring_the_whole_rollout():
    cfg = load_config(None, toy_overrides("flowrl", 1))
    ro, batch, task = _rollout(4, 4), _batch(4), ToyTask()
    scored = RolloutPipeline(cfg, task, reward_threads=3).score(batch, ro, policy_version=7)
    want = task.score(batch, ro.prompt_index, ro.token_lists())
    np.testing.assert_array_equal(scored.rewards, want)  # row order kept
    assert sorted(s.prompt_index for g in scored.groups for s in g[:1]) == [0, 1, 2, 3]
    for g in scored.groups:  # each group: one prompt's G samples, by sample index
        assert [s.sample_index for s in g] == [0, 1, 2, 3]
        assert len({s.prompt_index for s in g}) == 1
    assert (scored.policy_versions == 7).all()


def test_regroup_names_a_prompt_with_missing_samples():
    samples = [Sample(i, p, s, (1,), 0, 1.0) for i, (p, s) in
               enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (2, 0)])]
    ds = GroupByPrompt(scored_samples(samples, ToyTask(), _batch(3), 1), 2)
    it = iter(ds)
    assert [s.row for s in next(it)] == [0, 2]
    assert [s.row for s in next(it)] == [1, 3]
    with pytest.raises(ValueError, match="prompt 2 has 1 of its 2 samples"):
        next(it)
    with pytest.raises(ValueError, match=r"rows \[1\] were never scored"):
        rewards_by_row([[samples[0]]], 2)


def test_minibatch_stage_cuts_like_the_numpy_reference():
    ro = _rollout(4, 4, seed=1)
    data = build_rollout_batch(_batch(4).prompts, ro.prompt_index, ro.tokens, ro.lengths,
                               np.arange(16, dtype=np.float32), 4, 6)
    rng = np.random.default_rng([0, 3, 2])
    want = [mb for _ in range(2) for mb in minibatches(data, 6, rng, (2, 4), 6)]
    got = list(MiniBatches(data, 6, np.random.default_rng([0, 3, 2]), 2, (2, 4), 6))
    assert len(got) == len(want) == 6  # 16 rows → 3 mini-batches of 6 (last padded), 2 epochs
    for a, b in zip(got, want):
        assert a.as_dict().keys() == b.as_dict().keys()
        for k, v in a.as_dict().items():
            np.testing.assert_array_equal(v, b.as_dict()[k], err_msg=k)


def test_pipeline_state_counts_steps_and_refuses_a_mid_step_state():
    cfg = load_config(None, toy_overrides("flowrl", 1))
    pipe = RolloutPipeline(cfg, ToyTask())
    ro = _rollout(4, 4)
    data = build_rollout_batch(_batch(4).prompts, ro.prompt_index, ro.tokens, ro.lengths,
                               np.zeros(16, np.float32), 4, 8)
    it = pipe.minibatches(data, 5, 8)
    next(it)
    assert pipe.get_state() == {"steps": 0, "minibatches": 1}
    assert len(list(it)) == 1
    assert pipe.get_state() == {"steps": 6, "minibatches": 0}
    with pytest.raises(ValueError, match="middle of a step"):
        pipe.set_state({"steps": 6, "minibatches": 1})


@pytest.mark.parametrize("key,value", [("trainer.rollout_pipeline", "pandas"),
                                       ("trainer.reward_threads", 0),
                                       ("rollout.backend", "vllm"), ("rollout.timeout_s", 0)])
def test_bad_pipeline_and_backend_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, toy_overrides("flowrl", 1, **{key: value}))


@pytest.mark.slow
def test_trainer_through_the_pipeline_equals_the_numpy_path(tmp_path):
    """FlowRL (reference, Z-network, r̂), 2 steps of 2 epochs each, both paths at once."""
    runs = {kind: start_train(tmp_path / kind, toy_overrides("flowrl", 2, **{
        "trainer.rollout_pipeline": kind, "trainer.epochs": 2, "trainer.checkpoint_every": 2}))
        for kind in ("grain", "numpy")}
    for kind, p in runs.items():
        assert p.wait(600) == 0, (tmp_path / f"{kind}.log").read_text()[-3000:]
    recs = stable_records(tmp_path / "grain")
    assert recs == stable_records(tmp_path / "numpy")
    assert len(recs) == 2 and recs[-1]["optimizer/updates"] == 4
    a, b = checkpoint_arrays(tmp_path / "grain", 2), checkpoint_arrays(tmp_path / "numpy", 2)
    assert a.keys() == b.keys() and len(a) > 20
    assert not [k for k in a if not np.array_equal(a[k], b[k])]
    meta = json.loads((tmp_path / "grain" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["rollout_state"] == {"steps": 2, "minibatches": 0}
