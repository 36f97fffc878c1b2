"""PPO's separate critic model (`algo.critic: model`, veRL's critic): a copy of the policy
initialised from the same weights, whose value loss never reaches the policy, with its own
learning rate, weight decay and grad-norm clip; the memory estimator counts it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from flowrl_jax.checkpoint.load import random_model
from flowrl_jax.config import (AlgoConfig, Config, ModelArch, ModelConfig, OptimizerConfig,
                               TrainerConfig, preset_arch)
from flowrl_jax.memory import estimate
from flowrl_jax.models.arch import param_count
from flowrl_jax.mesh import single_device_mesh
from flowrl_jax.models.qwen2 import Numerics
from flowrl_jax.rl.forward import forward
from flowrl_jax.rl.train_state import (adamw_updates, create_train_state, gradient_clip,
                                       make_optimizer)

TINY = ModelArch(**yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "flowrl_jax/configs/models/tiny.yaml").read_text()))


def _cfg(critic: str) -> Config:
    return Config(model=ModelConfig(), algo=AlgoConfig(name="ppo", critic=critic),
                  optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0),
                  trainer=TrainerConfig(mini_batch_size=4, micro_batch_size=2))


def _state(critic: str):
    mesh = single_device_mesh()
    return create_train_state(_cfg(critic), random_model(TINY, Numerics(), mesh, seed=0), mesh,
                              rng=0)


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY.vocab_size, (2, 10)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((2, 10), bool),
            "response_mask": jnp.ones((2, 4), jnp.float32)}


@pytest.mark.parametrize("critic", ["head", "model"])
def test_value_gradient_reaches_the_policy_only_with_a_head(critic):
    state = _state(critic)
    gds = dict(state.graphdefs)
    if critic == "model":
        assert set(state.params) == {"policy", "critic", "value"}
        for a, b in zip(jax.tree.leaves(state.params["policy"]),
                        jax.tree.leaves(state.params["critic"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same checkpoint
            assert a is not b  # but separate buffers (the step donates the state)
    else:
        assert set(state.params) == {"policy", "value"}

    def values_sum(params):
        return jnp.sum(forward(_cfg(critic), gds, params, _batch(), train=True)["values"])

    g = jax.jit(jax.grad(values_sum))(state.params)
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))  # noqa: E731
    assert norm(g["value"]) > 0
    if critic == "model":
        assert norm(g["policy"]) == 0.0 and norm(g["critic"]) > 0
    else:
        assert norm(g["policy"]) > 0


def test_critic_has_its_own_clip_lr_and_weight_decay():
    """Gradients: actor norm 0.5 (under its clip 1.0), critic norm 100 (clipped to 1.0 on its
    own); with one shared clip the actor's gradient would shrink too. With zero gradients
    AdamW's step is −lr·wd·p: critic and head at critic_lr and critic_weight_decay."""
    cfg = Config(algo=AlgoConfig(name="ppo", critic="model", critic_lr=1e-2,
                                 critic_weight_decay=0.01, critic_grad_clip=1.0),
                 optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0))
    params = {"policy": {"w": jnp.ones((4,))}, "critic": {"w": jnp.ones((3,))},
              "value": {"k": jnp.ones((1,))}}
    grads = {"policy": {"w": jnp.full((4,), 0.25)}, "critic": {"w": jnp.zeros((3,))},
             "value": {"k": jnp.full((1,), 100.0)}}
    out, _ = gradient_clip(cfg, tuple(params)).update(grads, None, params)
    np.testing.assert_allclose(np.asarray(out["policy"]["w"]), 0.25, rtol=1e-6)  # untouched
    np.testing.assert_allclose(np.asarray(out["value"]["k"]), 1.0, rtol=1e-6)  # 100 → 1
    shared, _ = gradient_clip(_cfg("head"), ("policy", "value")).update(
        {"policy": grads["policy"], "value": grads["value"]}, None, None)
    assert float(shared["policy"]["w"][0]) < 0.01  # the shared clip would shrink the actor
    # lr and weight decay: zero gradients → the step is −lr·wd·p per role
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(cfg, tuple(params))
    ref, st = tx.update(zeros, tx.init(params), params)
    ours = adamw_updates(cfg, st, params)
    for upd in (ref, ours):
        np.testing.assert_allclose(np.asarray(upd["policy"]["w"]), -1e-3 * 0.1, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["critic"]["w"]), -1e-2 * 0.01, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["value"]["k"]), -1e-2 * 0.01, rtol=1e-6)


def test_ppo_step_with_a_critic_model_trains_both():
    from flowrl_jax.bench import train as bench
    from flowrl_jax.rl.train_step import make_train_step

    cfg = _cfg("model")
    state = _state("model")
    before = jax.tree.map(np.asarray, jax.device_get(state.params))
    step = make_train_step(cfg, state, single_device_mesh())
    batch = bench._inputs(TINY, 4, 6, 6)
    batch.update(advantages=np.ones((4, 6), np.float32), returns=np.ones((4, 6), np.float32),
                 old_values=np.zeros((4, 6), np.float32))
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm_critic"]) > 0
    after = jax.tree.map(np.asarray, jax.device_get(state.params))
    for role in ("policy", "critic", "value"):
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[role]),
                                                          jax.tree.leaves(before[role]))]
        assert any(moved), role


def test_memory_estimate_counts_the_critic_model():
    cfg = Config(model=ModelConfig(preset="qwen2.5-0.5b"), algo=AlgoConfig(name="ppo"))
    arch = preset_arch("qwen2.5-0.5b")
    shape = {"data": 1, "fsdp": 8, "tensor": 1}
    head = estimate(cfg, arch, shape, (1e15, "x"))
    model = estimate(Config(model=cfg.model, algo=AlgoConfig(name="ppo", critic="model")), arch,
                     shape, (1e15, "x"))
    copy = param_count(arch) * 4 / 8  # the critic model: one more float32 policy, sharded
    assert model.params - head.params == copy  # (both have the replicated value head)
    assert model.grads - head.grads == 2 * copy  # accumulator + one micro-batch's
    assert model.optimizer - head.optimizer == 2 * copy and model.ref == head.ref
    assert model.activations > head.activations
    # the setting means nothing for an algorithm without a critic
    flow = AlgoConfig(name="flowrl", critic="model")
    assert estimate(Config(model=cfg.model, algo=flow), arch, shape, (1e15, "x")).params == \
        estimate(Config(model=cfg.model, algo=AlgoConfig(name="flowrl")), arch, shape,
                 (1e15, "x")).params
