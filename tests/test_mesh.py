"""mesh.py: -1 resolution, clear errors, logical axis → PartitionSpec, param shardings."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from flowrl_jax.config import ConfigError, MeshConfig, ModelArch
from flowrl_jax.mesh import (logical_to_spec, make_mesh, resolve_axis_sizes, state_shardings)


@pytest.mark.parametrize("cfg, n, want", [
    (MeshConfig(data=1, fsdp=-1, tensor=1), 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    (MeshConfig(data=-1, fsdp=2, tensor=1), 8, {"data": 4, "fsdp": 2, "tensor": 1}),
    (MeshConfig(data=2, fsdp=2, tensor=2), 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    (MeshConfig(data=1, fsdp=-1, tensor=1), 1, {"data": 1, "fsdp": 1, "tensor": 1}),
])
def test_minus_one_takes_the_remaining_devices(cfg, n, want):
    assert resolve_axis_sizes(cfg, n) == want


@pytest.mark.parametrize("cfg, n, msg", [
    (MeshConfig(data=3, fsdp=-1, tensor=1), 8, "= 3 does not divide the 8 available devices"),
    (MeshConfig(data=2, fsdp=2, tensor=1), 8, "= 4 but 8 devices are available"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), 8, "at most one axis may be -1"),
    (MeshConfig(data=0, fsdp=-1, tensor=1), 8, "mesh.data: must be -1 or >= 1"),
])
def test_bad_mesh_errors_name_the_axes(cfg, n, msg):
    with pytest.raises(ConfigError) as e:
        resolve_axis_sizes(cfg, n)
    assert msg in str(e.value)


def test_make_mesh_on_8_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert len(set(mesh.devices.flat)) == 8 == len(jax.devices())


def test_logical_to_spec_rules_and_divisibility():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    # a mesh axis shards one dimension only: 'batch' takes fsdp, so 'embed' stays replicated
    assert logical_to_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("vocab", "embed"), mesh, (128, 64)) == P("tensor", "fsdp")
    # a dimension the axes do not divide is replicated (or keeps one axis that divides)
    assert logical_to_spec(("vocab", "embed"), mesh, (127, 64)) == P(None, "fsdp")
    assert logical_to_spec(("batch",), mesh, (6,)) == P("data")
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    assert logical_to_spec(("vocab", "embed"), one, (128, 64)) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("bogus",))


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unrolled"])
def test_state_shardings_follow_param_metadata(scanned):
    from flax import nnx

    from flowrl_jax.models.qwen2 import Numerics, abstract_model

    arch = ModelArch(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    _, state = nnx.split(abstract_model(arch, Numerics(scan_layers=scanned)))
    sh = state_shardings(state, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert sh["embed_tokens"].spec == P("tensor", "fsdp")
    # stacked layers: the leading `layers` axis is not sharded
    layer, lead = (sh["layers"]["stacked"], (None,)) if scanned else (sh["layers"][0], ())
    assert layer["self_attn"]["o_proj"]["weight"].spec == P(*lead, "fsdp", "tensor")
    assert layer["self_attn"]["k_proj"]["bias"].spec == P(*lead, "tensor")
    assert layer["input_layernorm"]["weight"].spec == P(*lead, None)
    assert sh["lm_head"]["weight"].spec == P("tensor", "fsdp")
