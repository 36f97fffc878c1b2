"""The demo task's reward table, target and summary metrics against hand-computed values."""

import math

import numpy as np
import pytest

from flowrl_jax.demo.task import DemoTask, kl, mode_masses, summarize


def test_reward_table_modes():
    task = DemoTask(num_prompts=2, vocab_size=32)
    r = task.reward_table()
    assert task.mode_tokens(1) == [11, 15, 19]
    assert r[1, 11] == 1.0 and r[1, 15] == 0.8 and r[1, 19] == 0.6
    assert r.sum() == pytest.approx(2 * (1.0 + 0.8 + 0.6))
    assert task.reward(0, [10, 2]) == 1.0 and task.reward(0, [11]) == 0.0 and task.reward(0, []) == 0.0


def test_task_too_big_for_vocab():
    with pytest.raises(ValueError, match="vocabulary"):
        DemoTask(num_prompts=8, vocab_size=20)


def test_target_is_ref_times_exp_beta_r():
    task = DemoTask(num_prompts=1, vocab_size=32)
    ref = np.full((1, 32), -math.log(32))  # uniform reference
    p = task.target(ref, beta=5.0)
    w = np.ones(32)
    w[[10, 14, 18]] = [math.exp(5.0), math.exp(4.0), math.exp(3.0)]
    np.testing.assert_allclose(p[0], w / w.sum(), rtol=1e-12)


def test_kl_hand_case():
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.25, 0.5]])
    assert kl(p, q) == pytest.approx(math.log(2))
    assert kl(p, p) == 0.0


def test_summary_counts_covered_modes():
    task = DemoTask(num_prompts=1, vocab_size=32)
    target = np.full((1, 32), 0.0)
    target[0, [10, 14, 18]] = [0.5, 0.3, 0.2]
    collapsed = np.full((1, 32), 0.0)
    collapsed[0, 10] = 1.0
    spread = np.full((1, 32), 0.0)
    spread[0, [10, 14, 18]] = [0.45, 0.35, 0.2]
    s_col, s_spr = summarize(task, collapsed, target), summarize(task, spread, target)
    assert s_col["modes_covered"] == 1 and s_spr["modes_covered"] == 3
    assert s_col["mass_per_mode"] == [1.0, 0.0, 0.0]
    assert mode_masses(task, spread) == pytest.approx([0.45, 0.35, 0.2])
    assert s_spr["kl_target_policy"] < s_col["kl_target_policy"]
