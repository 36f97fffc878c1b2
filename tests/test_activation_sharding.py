"""Activations follow the logical-axis rules: on 8 fake CPU devices (data 2 × fsdp 2 ×
tensor 2) the compiled train step holds the MLP activations in the per-device shapes the
rules give, a mesh config's `rules` entries change them (and the parameter shardings), and
the numbers do not depend on the layout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowrl_jax.config import ConfigError, MeshConfig, load_config
from flowrl_jax.mesh import LOGICAL_RULES, make_mesh, rules_for, state_shardings
from flowrl_jax.rl.train_state import create_train_state
from flowrl_jax.rl.train_step import make_train_step
from test_train_step import INIT, TINY, B, P, R, fresh_state, full_batch, make_cfg

SEQ_PARALLEL = {"length": "tensor", "mlp": None}


def policy() -> nnx.Module:
    """The seed-0 tiny policy of test_train_step (fresh buffers)."""
    fresh_state(make_cfg("flowrl", B), "1")
    graphdef, params = INIT["policy"]
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def _mesh(rules=None):
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules=rules or {}))


@pytest.fixture(scope="module")
def step_hlo():
    """{rules name: (compiled HLO text of one FlowRL train step, its metrics)}."""
    cfg = make_cfg("flowrl", B)  # one micro-batch: activations are [B, P + R, …]
    batch = full_batch(cfg, fresh_state(cfg, "1"))
    out = {}
    try:
        for name, rules in (("default", None), ("seq", SEQ_PARALLEL)):
            mesh = _mesh(rules)
            state = create_train_state(cfg, policy(), mesh, rng=0)
            step = make_train_step(cfg, state, mesh)
            placed = step.place(batch)
            text = step.compiled(placed).lower(state, placed).compile().as_text()
            _, metrics = step(state, batch)
            out[name] = (text, jax.tree.map(np.asarray, metrics))
    finally:
        _mesh()  # the other tests' meshes on these devices keep the default rules
    return out


def _has(text: str, shape: tuple) -> bool:
    return re.search(r"f32\[%s\]" % ",".join(map(str, shape)), text) is not None


def test_default_rules_shard_mlp_activations(step_hlo):
    text, _ = step_hlo["default"]
    rows, t, mlp = B // 4, P + R, TINY.intermediate_size
    assert _has(text, (rows, t, mlp // 2))  # batch over data×fsdp, mlp over tensor
    assert not _has(text, (rows, t // 2, mlp))  # no sequence sharding unless asked


def test_mesh_rules_change_activation_layout(step_hlo):
    text, _ = step_hlo["seq"]
    rows, t, mlp = B // 4, P + R, TINY.intermediate_size
    assert _has(text, (rows, t // 2, mlp))  # length over tensor, mlp whole


def test_layout_does_not_change_the_numbers(step_hlo):
    (_, a), (_, b) = step_hlo["default"], step_hlo["seq"]
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_rules_apply_to_parameters_too():
    model_state = nnx.state(policy())
    try:
        # the layers stacked (the default): their leading `layers` axis is never sharded
        w = lambda m: state_shardings(model_state, m)["layers"]["stacked"]["mlp"]["up_proj"]["weight"]  # noqa: E731
        assert w(_mesh()).spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
        assert rules_for(_mesh({"mlp": None, "embed": ["fsdp", "data"]})) != LOGICAL_RULES
        assert w(_mesh({"mlp": None, "embed": ["fsdp", "data"]})).spec == \
            jax.sharding.PartitionSpec(None, None, ("fsdp", "data"))
    finally:
        _mesh()


def test_rules_from_config_and_errors():
    cfg = load_config(None, ["mesh.rules.length=tensor", "mesh.rules.mlp=null"])
    assert cfg.mesh.rules == {"length": "tensor", "mlp": None}
    with pytest.raises(ConfigError, match=r"mesh\.rules\.lenght"):
        load_config(None, ["mesh.rules.lenght=tensor"])
    with pytest.raises(ConfigError, match=r"mesh\.rules\.mlp"):
        load_config(None, ["mesh.rules.mlp=tpu"])
