"""Every bad checkpoint input gives a CheckpointError naming the file and/or tensor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from _ckpt_util import make_hf
from flowrl_jax.checkpoint import CheckpointError, orbax
from flowrl_jax.checkpoint.hf import load_hf, read_arch
from flowrl_jax.mesh import single_device_mesh
from flowrl_jax.models.qwen2 import with_layer_form

W = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d, _ = make_hf(tmp_path_factory.mktemp("good") / "hf", tie=False, kv=2)
    return d


@pytest.fixture()
def bad(good, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    return d


def load(d):
    return load_hf(d, single_device_mesh())


def rewrite(d, fn):
    tensors = load_file(str(d / W))
    fn(tensors)
    save_file(tensors, str(d / W), metadata={"format": "pt"})


def test_good_checkpoint_loads(good):
    model, arch = load(good)
    assert arch.hidden_size == 64 and model.lm_head is not None


def test_missing_tensor(bad):
    rewrite(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"bad.*'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load(bad)


def test_unexpected_tensor(bad):
    rewrite(bad, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load(bad)


def test_wrong_shape(bad):
    rewrite(bad, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"):
        load(bad)


def test_unknown_architecture(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture.*llama"):
        read_arch(bad)


def test_config_missing_key(bad):
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["hidden_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing key 'hidden_size'"):
        load(bad)


def test_truncated_file(bad):
    data = (bad / W).read_bytes()
    (bad / W).write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"):
        load(bad)


def test_corrupt_header(bad):
    data = bytearray((bad / W).read_bytes())
    data[8:20] = b"\xff" * 12
    (bad / W).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load(bad)
    (bad / W).write_bytes(b"\x00\x00\x01")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load(bad)


def test_missing_files(bad, tmp_path):
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"bad/config\.json: missing"):
        load(bad)
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nowhere")


def test_no_weights_and_missing_shard(good, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(good / "config.json", d)
    with pytest.raises(CheckpointError, match=r"noweights: no model\.safetensors"):
        load(d)
    names = list(load_file(str(good / W)))
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: missing shard"):
        load(d)


def test_tied_checkpoint_with_redundant_lm_head_loads(tmp_path):
    d, _ = make_hf(tmp_path / "hf", tie=True)
    rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    model, arch = load(d)
    assert arch.tie_word_embeddings and model.lm_head is None


# --------------------------------------------------------------------------- Orbax


@pytest.fixture(scope="module")
def ckpt(good, tmp_path_factory):
    model, arch = load(good)
    d = tmp_path_factory.mktemp("ock") / "ckpt"
    orbax.save_policy(d, model, arch, step=1)
    return d


@pytest.fixture()
def bad_ckpt(ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    return d


def test_orbax_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: checkpoint directory does not exist"):
        orbax.restore_policy(tmp_path / "nope", single_device_mesh())


def test_orbax_missing_model_json(bad_ckpt):
    (bad_ckpt / "model.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt/model\.json: missing"):
        orbax.restore_policy(bad_ckpt, single_device_mesh())


def test_orbax_no_complete_step(bad_ckpt):
    shutil.rmtree(bad_ckpt / "1")
    (bad_ckpt / "2.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
    assert orbax.latest_step(bad_ckpt) is None
    with pytest.raises(CheckpointError, match=r"ckpt: no complete checkpoint step"):
        orbax.restore_policy(bad_ckpt, single_device_mesh())


def test_orbax_unknown_step(ckpt):
    with pytest.raises(CheckpointError, match=r"step 5 not found \(complete steps: \[1\]\)"):
        orbax.restore_policy(ckpt, single_device_mesh(), step=5)


@pytest.mark.parametrize("scanned,tensor,shapes", [
    (True, r"layers\.stacked\.mlp\.down_proj\.weight", r"\(2, 64, 128\), expected \(2, 64, 96\)"),
    (False, r"layers\.0\.mlp\.down_proj\.weight", r"\(64, 128\), expected \(64, 96\)"),
], ids=["scanned", "unrolled"])
def test_orbax_shape_mismatch(good, tmp_path, scanned, tensor, shapes):
    """Named in the layer form the checkpoint was saved in (scanned: the default)."""
    model, arch = load(good)
    d = tmp_path / "ckpt"
    orbax.save_policy(d, with_layer_form(model, scanned), arch, step=1)
    meta = json.loads((d / "model.json").read_text())
    meta["arch"]["intermediate_size"] = 96
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"policy: tensor '{tensor}' has shape {shapes}"):
        orbax.restore_policy(d, single_device_mesh())


def test_orbax_bad_model_json(bad_ckpt):
    meta = json.loads((bad_ckpt / "model.json").read_text())
    meta["arch"]["hidden_sise"] = 3
    (bad_ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.json: arch\.hidden_sise: unknown key"):
        orbax.restore_policy(bad_ckpt, single_device_mesh())


def test_orbax_refuses_to_overwrite_a_step(ckpt, good):
    model, arch = load(good)
    with pytest.raises(CheckpointError, match="step 1 already exists"):
        orbax.save_policy(ckpt, model, arch, step=1)
