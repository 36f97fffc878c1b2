"""Logits of our Qwen2 (loaded through the HF importer) vs transformers' PyTorch Qwen2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ckpt_util import hf_logits, make_hf
from flowrl_jax.checkpoint.hf import load_hf
from flowrl_jax.config import MeshConfig
from flowrl_jax.mesh import make_mesh, single_device_mesh
from flowrl_jax.models.qwen2 import Numerics

# tied/untied × kv heads (= heads, heads/2, 1) × two RoPE θ, covered by three models.
CASES = {
    "tied-kv2-theta1e4": dict(tie=True, kv=2, theta=1e4),
    "untied-kv4-theta1e6": dict(tie=False, kv=4, theta=1e6),
    "tied-kv1-theta1e6": dict(tie=True, kv=1, theta=1e6),
}
IDS = np.random.default_rng(0).integers(0, 128, (2, 12))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {k: make_hf(root / k, seed=i, **kw) for i, (k, kw) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def forward():
    # One jitted forward per model structure, shared by the tests in this module.
    @jax.jit
    def fwd(model, ids, mask):
        return model(ids, mask).logits
    return lambda model, ids, mask=None: np.asarray(fwd(model, jnp.asarray(ids), None if mask is None
                                                         else jnp.asarray(mask)))


@pytest.mark.parametrize("case", list(CASES))
def test_float32_logits_match_transformers(hf_models, forward, case):
    path, ref_model = hf_models[case]
    model, arch = load_hf(path, single_device_mesh())
    assert arch.tie_word_embeddings == CASES[case]["tie"]
    assert (model.lm_head is None) == CASES[case]["tie"]
    assert arch.num_key_value_heads == CASES[case]["kv"] and arch.rope_theta == CASES[case]["theta"]
    ours, ref = forward(model, IDS), hf_logits(ref_model, IDS)
    assert np.abs(ref).max() > 1.0  # logits are not trivially tiny
    assert np.abs(ours - ref).max() <= 1e-4


def test_left_padded_batch_equals_unpadded_rows(hf_models, forward):
    path, ref_model = hf_models["tied-kv2-theta1e4"]
    model, _ = load_hf(path, single_device_mesh())
    t = 12
    lengths = [12, 7, 3]
    rows = [np.random.default_rng(i + 1).integers(3, 128, (n,)) for i, n in enumerate(lengths)]
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = True
    padded = forward(model, ids, mask)
    for i, r in enumerate(rows):  # each padded row = the same row alone in transformers
        np.testing.assert_allclose(padded[i, t - len(r):], hf_logits(ref_model, r[None])[0],
                                   atol=1e-4, rtol=0)
    alone = forward(model, rows[1][None])[0]  # and = the row alone through our model
    np.testing.assert_allclose(padded[1, t - len(rows[1]):], alone, atol=1e-5, rtol=0)


def test_bfloat16_logits_close_to_float32_reference(hf_models, forward, record_property):
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 %) for the weights and
    # every activation; through 2 layers and a 64-wide dot product per logit the error is a
    # few bf16 ulps of the logit scale. We bound it at 3 % of the largest |logit| (measured
    # ≈ 1 %), which still catches a wrong layout/transposition (errors of order 100 %).
    path, ref_model = hf_models["untied-kv4-theta1e6"]
    num = Numerics(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    model, _ = load_hf(path, single_device_mesh(), num)
    assert model.layers[0].mlp.up_proj.weight.get_value().dtype == jnp.bfloat16
    ours = forward(model, IDS).astype(np.float32)
    ref = hf_logits(ref_model, IDS)
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    record_property("bf16_max_abs_diff", diff)
    record_property("bf16_rel_diff", diff / scale)
    print(f"bf16 vs f32 reference: max abs diff {diff:.4g} (logit scale {scale:.3g}, "
          f"relative {diff / scale:.3%})")
    assert diff <= 0.03 * scale
    # and the top token agrees almost everywhere
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_sharded_forward_on_8_devices_equals_single_device(hf_models, forward):
    assert len(jax.devices()) >= 8
    path, _ = hf_models["untied-kv4-theta1e6"]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    sharded, _ = load_hf(path, mesh)
    q = sharded.layers[0].self_attn.q_proj.weight.get_value()
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2)
    single, _ = load_hf(path, single_device_mesh())
    ids = np.random.default_rng(5).integers(0, 128, (4, 12))
    np.testing.assert_allclose(forward(sharded, ids), forward(single, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("products,transposed", [("elementwise", True), ("matmul", False)])
def test_decode_path_token_by_token_equals_the_full_forward(products, transposed):
    """The decode path the sampler runs (models/decode.py): each row's prompt prefilled into a
    longer decode cache, then one token per `decode_forward` call at per-row positions, gives
    the full forward's logits, for rows of different prompt lengths; in both attention forms
    (CPU elementwise / accelerator matmul), with and without [in, out] weight copies."""
    from flowrl_jax.models.decode import (decode_forward, empty_cache, prefill, rope_table,
                                          transposed_weights)
    from flowrl_jax.testing import tiny_arch, tiny_model

    arch = tiny_arch(64)
    model = tiny_model(arch, seed=2)
    ids = np.random.default_rng(4).integers(0, 64, (2, 9))
    full = np.asarray(jax.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))
    s, p = 12, 5
    starts = np.array([5, 3])  # tokens [0, start) prefill row b; the rest go one at a time
    prefix = np.zeros((2, p), np.int32)
    for r, n in enumerate(starts):
        prefix[r, :n] = ids[r, :n]
    pre = jax.jit(prefill, static_argnums=3)(model, jnp.asarray(prefix), jnp.asarray(starts),
                                             jnp.float32)
    assert pre[0].k.shape == (2, arch.num_key_value_heads, arch.resolved_head_dim, p)
    cache = [c._replace(k=c.k.at[..., :p].set(q.k), v=c.v.at[..., :p].set(q.v))
             for c, q in zip(empty_cache(arch, 2, s, jnp.float32), pre)]
    mats = jax.jit(transposed_weights)(model) if transposed else None
    rope = rope_table(arch, s)
    step = jax.jit(lambda m, tok, pos, c, mats: decode_forward(m, tok, pos, c, rope, mats, products))
    pos = starts.copy()
    while (pos < 9).any():
        at = np.minimum(pos, 8)
        logits, cache = step(model, jnp.asarray(ids[np.arange(2), at], jnp.int32),
                             jnp.asarray(at, jnp.int32), cache, mats)
        for r in range(2):
            if pos[r] < 9:
                np.testing.assert_allclose(np.asarray(logits)[r], full[r, at[r]], atol=1e-4)
        pos = pos + 1
