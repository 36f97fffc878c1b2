"""The train step's AdamW: `adamw_updates` (the update computed from the advanced optimizer
state, which the train step applies) equals optax's own AdamW updates, through warm-up,
gradient clipping and a separate Z-network learning rate; and the compiled train step keeps
no copy of the optimizer moments."""

from __future__ import annotations

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
