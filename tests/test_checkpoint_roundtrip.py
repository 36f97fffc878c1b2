"""HF → NNX → Orbax → NNX → HF round trips, mesh changes, dtypes and load_model dispatch."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import AutoModelForCausalLM

from _ckpt_util import hf_logits, jax_logits, make_hf
from flowrl_jax.checkpoint import CheckpointError, orbax
from flowrl_jax.checkpoint.hf import (INDEX_FILE, export_hf, index_tensors, iter_hf_tensors,
                                      load_hf)
from flowrl_jax.config import MeshConfig, ModelConfig
from flowrl_jax.mesh import make_mesh, single_device_mesh
from flowrl_jax.checkpoint.load import load_model, model_kind, random_model
from flowrl_jax.models.qwen2 import Numerics

IDS = np.random.default_rng(1).integers(0, 128, (2, 9))


def tensors(d) -> dict[str, np.ndarray]:
    return dict(iter_hf_tensors(d))


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    # multi-file input: a small max_shard_size makes save_pretrained write an index + shards
    d, m = make_hf(tmp_path_factory.mktemp("untied") / "hf", tie=False, kv=2,
                   max_shard_size="40KB")
    return d, m


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("tied") / "hf", tie=True, kv=1, theta=1e6, seed=3)


@pytest.fixture(scope="module")
def ckpt(untied, tmp_path_factory):
    path, _ = untied
    model, arch = load_hf(path, single_device_mesh())
    d = tmp_path_factory.mktemp("orbax") / "ckpt"
    orbax.save_policy(d, model, arch, step=7)
    return d


def test_multi_file_input_is_indexed(untied):
    path, _ = untied
    assert (path / INDEX_FILE).exists() and len(list(path.glob("*.safetensors"))) > 2
    names = index_tensors(path)
    assert "lm_head.weight" in names and "model.layers.1.self_attn.k_proj.bias" in names


def test_hf_orbax_hf_round_trip_is_bit_exact(untied, ckpt, tmp_path):
    path, ref_model = untied
    assert orbax.latest_step(ckpt) == 7 and (ckpt / "model.json").exists()
    model, arch = orbax.restore_policy(ckpt, single_device_mesh())
    out = export_hf(model, arch, tmp_path / "hf", shard_size="100KB")
    assert len(out.files) > 1 and (tmp_path / "hf" / INDEX_FILE).exists()
    assert_bit_exact(tensors(path), tensors(tmp_path / "hf"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.array_equal(hf_logits(reloaded, IDS), hf_logits(ref_model, IDS))


def test_tied_round_trip_writes_no_lm_head(tied, tmp_path):
    path, ref_model = tied
    assert "lm_head.weight" not in index_tensors(path)  # transformers 5 saves none when tied
    model, arch = load_hf(path, single_device_mesh())
    orbax.save_policy(tmp_path / "ck", model, arch)
    model2, arch2 = orbax.restore_policy(tmp_path / "ck", single_device_mesh())
    assert arch2 == arch and model2.lm_head is None
    export_hf(model2, arch2, tmp_path / "hf")
    got = tensors(tmp_path / "hf")
    assert "lm_head.weight" not in got
    assert_bit_exact(tensors(path), got)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.tie_word_embeddings
    assert np.array_equal(hf_logits(reloaded, IDS), hf_logits(ref_model, IDS))


def test_restore_onto_another_mesh(ckpt, untied, tmp_path):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    model, arch = orbax.restore_policy(ckpt, mesh)
    single, _ = orbax.restore_policy(ckpt, single_device_mesh())
    k = model.layers[1].mlp.down_proj.weight.get_value()
    assert k.sharding.mesh.shape == mesh.shape and k.sharding.spec == P("fsdp", "tensor")
    assert k.addressable_shards[0].data.shape == (k.shape[0] // 2, k.shape[1] // 2)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(single))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # exporting from the sharded model gathers each tensor: same bytes as the original
    export_hf(model, arch, tmp_path / "hf")
    assert_bit_exact(tensors(untied[0]), tensors(tmp_path / "hf"))


def test_export_keeps_bf16_and_casts_on_request(untied, tmp_path):
    path, ref_model = untied
    num = Numerics(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    model, arch = load_hf(path, single_device_mesh(), num)
    s = export_hf(model, arch, tmp_path / "bf16")
    assert s.dtype == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    got = tensors(tmp_path / "bf16")
    assert all(str(v.dtype) == "bfloat16" for v in got.values())
    # bf16 on disk = the f32 original rounded to bf16 (round-to-nearest-even)
    orig = tensors(path)
    for k in orig:
        assert np.array_equal(got[k], orig[k].astype(got[k].dtype)), k
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    export_hf(model, arch, tmp_path / "f32", dtype="float32")
    assert all(v.dtype == np.float32 for v in tensors(tmp_path / "f32").values())
    m_default, _, _ = load_model(tmp_path / "bf16", single_device_mesh())  # keeps bf16
    assert m_default.embed_tokens.get_value().dtype == jnp.bfloat16
    # a bf16 file imported as float32 params is widened exactly
    m32, _ = load_hf(tmp_path / "bf16", single_device_mesh())
    up = m32.layers[0].mlp.up_proj.weight.get_value()
    assert up.dtype == jnp.float32
    assert np.array_equal(np.asarray(up), got["model.layers.0.mlp.up_proj.weight"].astype(np.float32))


def test_export_refuses_parameters_outside_the_policy(untied, tmp_path):
    path, _ = untied
    model, arch = load_hf(path, single_device_mesh())
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state["z_net"] = {"kernel": jnp.zeros((64, 1))}
    with pytest.raises(CheckpointError, match="z_net"):
        export_hf(state, arch, tmp_path / "x")
    del state["z_net"]
    del state["norm"]
    with pytest.raises(CheckpointError, match="norm"):
        export_hf(state, arch, tmp_path / "x")


def test_restore_casts_dtype_and_load_model_dispatch(untied, ckpt, tmp_path):
    path, ref_model = untied
    mesh = single_device_mesh()
    m_bf16, _ = orbax.restore_policy(ckpt, mesh, Numerics(jnp.bfloat16, jnp.bfloat16))
    assert m_bf16.embed_tokens.get_value().dtype == jnp.bfloat16
    # a training run directory keeps its checkpoints in RUN/checkpoints
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(ckpt, run / "checkpoints")
    ref = hf_logits(ref_model, IDS)
    for p, kind in ((path, "hf"), (ckpt, "orbax"), (run, "orbax"), (run / "checkpoints", "orbax")):
        assert model_kind(p)[0] == kind
        model, arch, tok = load_model(p, mesh, ModelConfig())
        assert tok is None  # no tokenizer files in these dirs
        np.testing.assert_allclose(jax_logits(model, IDS), ref, atol=1e-4)
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path, mesh)


def test_tokenizer_travels_with_checkpoint(untied, tmp_path):
    from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER

    path, _ = untied
    model, arch = load_hf(path, single_device_mesh())
    orbax.save_policy(tmp_path / "ck", model, arch, tokenizer_dir=PACKAGED_TOKENIZER)
    _, _, tok = load_model(tmp_path / "ck", single_device_mesh())
    assert tok == tmp_path / "ck" / "tokenizer" and (tok / "vocab.json").exists()
    export_hf(model, arch, tmp_path / "hf", tokenizer_dir=tok)
    _, _, tok2 = load_model(tmp_path / "hf", single_device_mesh())
    assert tok2 == tmp_path / "hf" and (tok2 / "merges.txt").exists()


def test_random_model_is_sharded_and_deterministic(untied):
    from flowrl_jax.checkpoint.hf import read_arch

    arch = read_arch(untied[0])
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    a = random_model(arch, Numerics(), mesh, seed=1)
    b = random_model(arch, Numerics(), mesh, seed=1)
    c = random_model(arch, Numerics(), mesh, seed=2)
    e = a.embed_tokens.get_value()
    assert e.sharding.spec == P("tensor", "fsdp")
    assert np.array_equal(np.asarray(e), np.asarray(b.embed_tokens.get_value()))
    assert not np.array_equal(np.asarray(e), np.asarray(c.embed_tokens.get_value()))
