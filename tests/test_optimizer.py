"""The train step's AdamW: `adamw_updates` (the update computed from the advanced optimizer
state, which the train step applies) equals optax's own AdamW updates, through warm-up,
gradient clipping and a separate Z-network learning rate; and the compiled train step keeps
no copy of the optimizer moments."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowrl_jax.config import Config, OptimizerConfig
from flowrl_jax.rl.train_state import adamw_updates, make_optimizer


def test_adamw_updates_equal_optax_updates():
    cfg = Config(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=3, weight_decay=0.1, z_lr=5e-2,
                                           grad_clip=1.0))
    rng = np.random.default_rng(0)
    params = {"policy": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                         "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
              "z": {"k": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)}}
    tx = make_optimizer(cfg, ("policy", "z"))
    state = tx.init(params)
    for step in range(6):  # across the end of warm-up; step 2 has a gradient far above the clip
        scale = 100.0 if step == 2 else 0.3
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, p.dtype), params)
        ref, state = tx.update(grads, state, params)
        ours = adamw_updates(cfg, state, params)
        for (path, r), o in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(ours)):
            np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-6, atol=1e-12,
                                       err_msg=f"step {step} {jax.tree_util.keystr(path)}")
        params = optax.apply_updates(params, ref)


def test_train_step_keeps_no_copy_of_the_optimizer_moments():
    from flowrl_jax.config import AlgoConfig, ModelConfig, TrainerConfig
    from flowrl_jax.bench import train as bench
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.rl.train_state import create_train_state
    from flowrl_jax.rl.train_step import make_train_step

    arch = bench._arch("tiny")
    cfg = Config(model=ModelConfig(), algo=AlgoConfig(name="flowrl"),
                 trainer=TrainerConfig(mini_batch_size=2, micro_batch_size=2))
    mesh = single_device_mesh()
    state = create_train_state(cfg, random_model(arch, Numerics.from_config(cfg.model), mesh, seed=0),
                               mesh, rng=0)
    step = make_train_step(cfg, state, mesh)
    batch = step.place(bench._inputs(arch, 2, 8, 8))
    hlo = step.compiled(batch).lower(state, batch).compile().as_text()
    copied = [line for line in hlo.splitlines() if re.search(r"= \S+ copy\(%?\S*opt_state", line)]
    assert not copied, f"{len(copied)} optimizer-state copies, e.g. {copied[0].strip()[:200]}"


# --------------------------------------------------------------------------- warm-up unit

# The paper recipe (configs/math-base.yaml): 512 prompts × 8 samples = 4096 sequences per
# rollout step, mini-batch 256 → 16 optimizer updates per rollout step, lr 1e-6, warm-up 10.
UPDATES_PER_STEP = 16
# Written by hand from the official run (torch's get_constant_schedule_with_warmup(10),
# stepped once per rollout step): lr of every update of rollout step s = 1e-6 · min(1, s/10).
PAPER_LR_BY_ROLLOUT_STEP = [0.0, 1e-7, 2e-7, 3e-7, 4e-7, 5e-7, 6e-7, 7e-7, 8e-7, 9e-7,
                            1e-6, 1e-6]
# The `update` unit (code default): update k gets 1e-6 · min(1, (k + 1)/10), so updates
# 0..9 of rollout step 0 ramp and everything after is at the full lr.
UPDATE_UNIT_FIRST_UPDATES = [1e-7, 2e-7, 3e-7, 4e-7, 5e-7, 6e-7, 7e-7, 8e-7, 9e-7, 1e-6,
                             1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6]


def _paper_optimizer():
    from flowrl_jax.config import load_config

    cfg = load_config("math-base.yaml")
    assert cfg.optimizer.warmup_unit == "rollout_step"
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps) == (1e-6, 10)
    per_step = (cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
                // cfg.trainer.mini_batch_size)
    assert per_step == UPDATES_PER_STEP and cfg.trainer.epochs == 1
    return cfg


def test_paper_config_warmup_per_rollout_step_table():
    from flowrl_jax.rl.train_state import lr_scale

    cfg = _paper_optimizer()
    opt = cfg.optimizer
    for s, want in enumerate(PAPER_LR_BY_ROLLOUT_STEP):
        for k in range(UPDATES_PER_STEP):
            got = opt.lr * float(lr_scale(opt, s * UPDATES_PER_STEP + k, s))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0,
                                       err_msg=f"rollout step {s}, update {k}")
    upd = dataclasses.replace(opt, warmup_unit="update")
    got = [opt.lr * float(lr_scale(upd, k, 0)) for k in range(UPDATES_PER_STEP)]
    np.testing.assert_allclose(got, UPDATE_UNIT_FIRST_UPDATES, rtol=1e-6, atol=0)
    # learning-rate mass of the first 10 rollout steps: the update unit gives ≈ 2.2×
    mass = lambda o: sum(float(lr_scale(o, s * 16 + k, s))  # noqa: E731
                         for s in range(10) for k in range(16))
    assert abs(mass(opt) - 72.0) < 1e-4 and abs(mass(upd) - 155.5) < 1e-4


def test_train_step_applies_the_rollout_step_warmup():
    """The real train step over the first 12 rollout steps × 16 updates of the paper recipe
    (tiny model, 2-sequence mini-batches): the lr metric of every update equals the table,
    rollout step 0 moves no parameter (lr 0) but does advance the optimizer moments, and
    rollout step 1 moves them."""
    from flowrl_jax.bench import train as bench
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.config import AlgoConfig, ModelConfig, TrainerConfig
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.rl.train_state import create_train_state, with_rollout_step
    from flowrl_jax.rl.train_step import make_train_step

    paper = _paper_optimizer()
    arch = bench._arch("tiny")
    cfg = Config(model=ModelConfig(), algo=AlgoConfig(name="flowrl", z_dropout=0.0),
                 optimizer=paper.optimizer,
                 trainer=TrainerConfig(mini_batch_size=2, micro_batch_size=2))
    mesh = single_device_mesh()
    state = create_train_state(cfg, random_model(arch, Numerics.from_config(cfg.model), mesh,
                                                 seed=0), mesh, rng=0)
    step = make_train_step(cfg, state, mesh)
    batch = step.place(bench._inputs(arch, 2, 8, 8))
    host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
    init = host(state.params)
    for s, want in enumerate(PAPER_LR_BY_ROLLOUT_STEP):
        assert int(state.rollout_step) == s
        for k in range(UPDATES_PER_STEP):
            state, m = step(state, batch)
            np.testing.assert_allclose(float(m["lr"]), want, rtol=1e-6, atol=0,
                                       err_msg=f"rollout step {s}, update {k}")
        if s == 0:
            same = jax.tree.map(np.array_equal, host(state.params), init)
            assert all(jax.tree.leaves(same)), "lr 0 in rollout step 0 changed a parameter"
            assert int(state.step) == UPDATES_PER_STEP
            mu = host(state.opt_state[1].inner_states["policy"].inner_state[0].mu["policy"])
            assert any(np.any(x != 0) for x in jax.tree.leaves(mu)), "moments did not move"
        if s == 1:
            same = jax.tree.map(np.array_equal, host(state.params["policy"]), init["policy"])
            assert not all(jax.tree.leaves(same)), "rollout step 1 changed nothing"
        state = with_rollout_step(state, s + 1)  # what the trainer does after each step


def test_critic_weight_decay_is_its_own():
    """With zero gradients AdamW's step is −lr·wd·p: the policy decays by its lr × 0.1, the
    critic (PPO value head) by critic_lr × algo.critic_weight_decay (veRL's 0.01)."""
    from flowrl_jax.config import AlgoConfig

    cfg = Config(algo=AlgoConfig(name="ppo", critic_lr=1e-2, critic_weight_decay=0.01),
                 optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.1))
    params = {"policy": {"w": jnp.full((3,), 2.0)}, "value": {"k": jnp.full((2,), 4.0)}}
    tx = make_optimizer(cfg, ("policy", "value"))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    ref, state = tx.update(zeros, state, params)
    ours = adamw_updates(cfg, state, params)
    for upd in (ref, ours):
        np.testing.assert_allclose(np.asarray(upd["policy"]["w"]), -1e-3 * 0.1 * 2.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["value"]["k"]), -1e-2 * 0.01 * 4.0, rtol=1e-6)
