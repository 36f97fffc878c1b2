"""`model.scan_layers`: the decoder layers stacked along a `layers` axis and run by one
lax.scan compute what the unrolled layers compute (logits and gradients, every remat policy),
stream into and out of HF safetensors and Orbax checkpoints in either form, and decode the
same greedy tokens; `model.remat` takes a policy name or a boolean."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowrl_jax.checkpoint import orbax
from flowrl_jax.checkpoint.hf import export_hf, iter_hf_tensors, load_hf
from flowrl_jax.config import REMAT, ConfigError, load_config
from flowrl_jax.mesh import single_device_mesh
from flowrl_jax.models import qwen2
from flowrl_jax.models.qwen2 import DecoderStack, Numerics, build_model, with_layer_form
from flowrl_jax.rl.forward import widest_layer
from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams
from flowrl_jax.testing import tiny_arch, tiny_model

ARCH = tiny_arch(64, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(3, 10)))
MASK = jnp.asarray(np.arange(10)[None, :] >= np.array([[0], [4], [7]]))  # left padding


def _loss(graphdef, params):
    logits = nnx.merge(graphdef, params)(IDS, MASK).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * MASK) + jnp.mean(logits ** 2)


def _unstacked_grads(model):
    """Value and gradients of `model`, gradients in the unrolled form (for comparing)."""
    graphdef, params = nnx.split(model)
    value, grads = jax.jit(jax.value_and_grad(lambda p: _loss(graphdef, p)))(params)
    grad_model = with_layer_form(nnx.merge(graphdef, grads), False)
    return value, nnx.state(grad_model)


@pytest.fixture(scope="module")
def unrolled():
    return build_model(ARCH, Numerics(scan_layers=False), seed=3)


@pytest.fixture(scope="module")
def unrolled_grads(unrolled):
    return _unstacked_grads(unrolled)


def test_same_seed_same_weights_in_either_form(unrolled):
    scanned = build_model(ARCH, Numerics(scan_layers=True), seed=3)
    assert isinstance(scanned.layers, DecoderStack) and len(scanned.layers) == 3
    w = scanned.layers.stacked.mlp.up_proj.weight
    assert w.get_value().shape == (3, 64, 32)
    assert w.get_metadata()["logical_axes"] == ("layers", "mlp", "embed")
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(scanned.layers[i].self_attn.k_proj.bias[...]),
                                      np.asarray(unrolled.layers[i].self_attn.k_proj.bias[...]))
        np.testing.assert_array_equal(np.asarray(w[...][i]),
                                      np.asarray(unrolled.layers[i].mlp.up_proj.weight[...]))


@pytest.fixture(params=["straight", "loop"])
def scan_form(request, monkeypatch):
    """How the scan runs: unrolled into straight-line code (stacks of at most
    UNROLL_MAX_LAYERS, ARCH's 3 layers) or as the loop deeper stacks run."""
    if request.param == "loop":
        monkeypatch.setattr(qwen2, "UNROLL_MAX_LAYERS", 0)
    return request.param


def _has_loop(model) -> bool:
    graphdef, params = nnx.split(model)
    hlo = jax.jit(lambda p: nnx.merge(graphdef, p)(IDS, MASK).logits).lower(params).as_text()
    return "stablehlo.while" in hlo


def test_shallow_stacks_are_unrolled_deep_ones_loop(unrolled, monkeypatch):
    """The stacked params either way; a loop in the program only above UNROLL_MAX_LAYERS."""
    scanned = with_layer_form(unrolled, True)
    assert qwen2.UNROLL_MAX_LAYERS >= 3 and not _has_loop(scanned)
    monkeypatch.setattr(qwen2, "UNROLL_MAX_LAYERS", 2)
    assert _has_loop(scanned)


@pytest.mark.parametrize("remat", REMAT)
def test_scanned_logits_and_gradients_equal_unrolled(unrolled, unrolled_grads, remat, scan_form):
    scanned = with_layer_form(unrolled, True)
    scanned.num = dataclasses.replace(scanned.num, remat=remat)
    np.testing.assert_allclose(np.asarray(scanned(IDS, MASK).logits),
                               np.asarray(unrolled(IDS, MASK).logits), rtol=1e-5, atol=1e-5)
    value, grads = _unstacked_grads(scanned)
    want_value, want = unrolled_grads
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    flat_got, flat_want = nnx.to_flat_state(grads), nnx.to_flat_state(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(w.get_value()),
                                   rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_scanned_prefill_keys_and_values_per_layer(unrolled, scan_form):
    scanned = with_layer_form(unrolled, True)
    got = scanned(IDS, MASK, return_kv=True).kv
    want = unrolled(IDS, MASK, return_kv=True).kv
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g.k), np.asarray(w.k), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g.v), np.asarray(w.v), rtol=1e-5, atol=1e-5)


def test_hf_round_trip_with_scanned_layers_is_bit_exact(unrolled, tmp_path):
    """Export streams each layer of the stacked arrays as its own HF tensor (the same files as
    the unrolled model writes); import fills the stacked arrays back, bit for bit."""
    scanned = tiny_model(ARCH, seed=4, num=Numerics(scan_layers=True))
    assert isinstance(scanned.layers, DecoderStack)
    export_hf(scanned, ARCH, tmp_path / "scanned")
    export_hf(with_layer_form(scanned, False), ARCH, tmp_path / "unrolled")
    a, b = dict(iter_hf_tensors(tmp_path / "scanned")), dict(iter_hf_tensors(tmp_path / "unrolled"))
    assert sorted(a) == sorted(b) and "model.layers.2.mlp.down_proj.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for scan in (True, False):
        loaded, _ = load_hf(tmp_path / "scanned", single_device_mesh(), Numerics(scan_layers=scan))
        assert isinstance(loaded.layers, DecoderStack) == scan
        got = nnx.to_flat_state(nnx.state(with_layer_form(loaded, True), nnx.Param))
        want = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
        assert len(got) == len(want)
        for path, var in got:
            np.testing.assert_array_equal(np.asarray(var.get_value()),
                                          np.asarray(want[path].get_value()), err_msg=str(path))


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_orbax_restores_either_saved_form_into_either_form(tmp_path, saved_scanned):
    model = tiny_model(ARCH, seed=5, num=Numerics(scan_layers=saved_scanned))
    orbax.save_policy(tmp_path / "ckpt", model, ARCH, step=1)
    want = dict(nnx.to_flat_state(nnx.state(with_layer_form(model, True), nnx.Param)))
    for scan in (True, False):
        restored, _ = orbax.restore_policy(tmp_path / "ckpt", single_device_mesh(),
                                           Numerics(scan_layers=scan))
        assert isinstance(restored.layers, DecoderStack) == scan
        got = nnx.to_flat_state(nnx.state(with_layer_form(restored, True), nnx.Param))
        for path, var in got:
            np.testing.assert_array_equal(np.asarray(var.get_value()),
                                          np.asarray(want[path].get_value()), err_msg=str(path))


def test_greedy_decode_tokens_equal_unrolled():
    """The sampler (prefill, insert, decode chunks: per-layer slices of the stacked params)
    generates the unrolled model's greedy tokens exactly, through both decode-step forms
    (the CPU [in, out] weight copies at 8 slots, the model's own layout at 2)."""
    arch = tiny_arch(128)
    scanned = tiny_model(arch, seed=0, num=Numerics(scan_layers=True))
    unrolled = tiny_model(arch, seed=0, num=Numerics(scan_layers=False))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 1, 9, 3, 12, 7)]
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    for slots in (8, 2):
        outs = []
        for model in (scanned, unrolled):
            engine = SamplingEngine(model, decode_slots=slots, decode_chunk=16,
                                    prefill_buckets=(8, 16), verbose=False)
            outs.append(engine.generate(model, prompts, params).token_lists())
        assert outs[0] == outs[1], f"{slots} slots"
        assert len({tuple(t) for t in outs[0]}) == len(prompts)


@pytest.mark.parametrize("value,name", [(True, "full"), (False, "none"), ("none", "none"),
                                        ("full", "full"), ("dots_saveable", "dots_saveable"),
                                        ("dots_with_no_batch_dims_saveable",
                                         "dots_with_no_batch_dims_saveable")])
def test_remat_accepts_policy_names_and_booleans(value, name):
    cfg = load_config(None, [f"model.remat={str(value).lower()}"])
    assert cfg.model.remat == name
    assert Numerics.from_config(cfg.model).remat == name
    assert Numerics(remat=value).remat == name


def test_remat_unknown_policy_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.remat: 'dots' is not one of"):
        load_config(None, ["model.remat=dots"])


def test_scan_layers_config_switch():
    assert load_config(None, []).model.scan_layers is True  # the default (see config/model.py)
    assert Numerics().scan_layers is True
    cfg = load_config(None, ["model.scan_layers=false"])
    assert Numerics.from_config(cfg.model).scan_layers is False


def test_widest_layer_is_the_same_in_either_form():
    """The MLP width that picks the passes' CPU compiler options (rl/forward.py) reads a
    stacked weight's per-layer shape."""
    arch = tiny_arch(64, hidden_size=32, intermediate_size=96, num_hidden_layers=4)
    for scan in (True, False):
        model = build_model(arch, Numerics(scan_layers=scan))
        assert widest_layer(nnx.state(model, nnx.Param)) == 96
