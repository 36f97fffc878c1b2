"""contiguous_causal_attention (model.attention='cudnn': the fused kernel on rows rotated
so their real tokens start at slot 0) against a float64 NumPy masked softmax, forward and
gradients, on rows with left padding, right padding, both, none and only padding; the model
with it against the default attention; and the host-side layout check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _attention_ref import np_attention
from flowrl_jax.config import ConfigError, ModelConfig
from flowrl_jax.models.attention import contiguous_causal_attention, require_contiguous_rows
from flowrl_jax.testing import tiny_arch, tiny_model


def _rows(t):
    valid = np.ones((5, t), bool)
    valid[0, :7] = False              # left padding (prompt)
    valid[1, t - 4:] = False          # right padding (response)
    valid[2, :3] = False              # both
    valid[2, t - 6:] = False
    valid[4, :] = False               # only padding (a filler row of a micro-batch)
    return valid


def test_matches_the_masked_softmax_on_real_tokens_with_gradients():
    t, n, kh, d = 24, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.normal(size=(5, t, h, d)) for h in (n, kh, kh, n))
    valid = _rows(t)
    real = valid[:, :, None, None]  # only real query positions are defined / read
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out = jax.jit(contiguous_causal_attention)(*f32, jnp.asarray(valid))
    ref = np_attention(q, k, v, valid)
    np.testing.assert_allclose(np.where(real, np.asarray(out), 0), np.where(real, ref, 0), atol=2e-5)
    assert np.all(np.isfinite(np.asarray(out)))

    loss = lambda *a: jnp.sum(contiguous_causal_attention(*a, jnp.asarray(valid))  # noqa: E731
                              * jnp.asarray(w * real, jnp.float32))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*f32)
    eps = 1e-6
    args = [q, k, v]
    for which in range(3):
        for idx in [(0, 9, 0, 1), (1, 3, 1, 2), (2, t - 8, 0, 5), (3, t - 1, kh - 1, 7)]:
            if which == 0:
                idx = (idx[0], idx[1], min(idx[2] * 2 + 1, n - 1), idx[3])
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[which][idx] += eps
            lo[which][idx] -= eps
            num = (np.sum(np_attention(*hi, valid) * w * real)
                   - np.sum(np_attention(*lo, valid) * w * real)) / (2 * eps)
            assert abs(float(grads[which][idx]) - num) < 1e-3 * max(1.0, abs(num)), (which, idx)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_model_with_cudnn_setting_matches_the_default_on_real_tokens():
    from flowrl_jax.models.qwen2 import Numerics

    arch = tiny_arch(64, num_hidden_layers=2)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (5, 24)), jnp.int32)
    valid = jnp.asarray(_rows(24))
    outs = {}
    for impl in ("plain", "cudnn"):
        model = tiny_model(arch, seed=3, scale=1.0, num=Numerics(attention=impl))
        outs[impl] = np.asarray(model(ids, valid).logits)
    real = np.asarray(valid)[:, :, None]
    np.testing.assert_allclose(np.where(real, outs["cudnn"], 0), np.where(real, outs["plain"], 0),
                               atol=1e-4, rtol=1e-4)


def test_layout_check_names_the_row_with_a_hole():
    good = _rows(10)
    require_contiguous_rows(good, "batch")  # left, right, both, none, all padding: fine
    bad = good.copy()
    bad[3, 4] = False  # padding between prompt and response
    with pytest.raises(ValueError, match="row 3 .*contiguous"):
        require_contiguous_rows(bad, "train_step[flowrl]")


def test_unknown_attention_setting_is_named():
    with pytest.raises(ConfigError, match="model.attention"):
        ModelConfig(attention="flash3").validate()


def test_kernel_choice_of_each_setting():
    """auto: fused only on an NVIDIA GPU in 16-bit, else our flash attention; cudnn always
    fused; plain is flash; xla the full softmax."""
    from flowrl_jax.models.attention import no_cache_kernel

    on_gpu = jax.default_backend() in ("gpu", "cuda")  # cpu in CI (conftest)
    assert no_cache_kernel("auto", jnp.bfloat16) == ("fused" if on_gpu else "flash")
    assert no_cache_kernel("auto", "float16") == ("fused" if on_gpu else "flash")
    assert no_cache_kernel("auto", jnp.float32) == "flash"
    assert {no_cache_kernel("cudnn", d) for d in ("float32", "bfloat16")} == {"fused"}
    assert no_cache_kernel("plain", jnp.float32) == "flash"
    assert no_cache_kernel("xla", jnp.bfloat16) == "softmax"


def test_train_step_and_logprobs_refuse_a_mask_with_a_hole_before_compiling():
    """With the fused path the layout is checked on the host: a hole in a row would be read
    as padding by the kernel, so it is an error that names the row, not a wrong gradient."""
    import dataclasses

    from flowrl_jax.config import AlgoConfig, Config, TrainerConfig
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.rl.train_state import create_train_state
    from flowrl_jax.rl.logprobs import LogProbs
    from flowrl_jax.rl.train_step import make_train_step

    arch = tiny_arch(64)
    cfg = Config(model=ModelConfig(attention="cudnn"), algo=AlgoConfig(name="flowrl"),
                 trainer=TrainerConfig(mini_batch_size=4, micro_batch_size=4))
    mesh = single_device_mesh()
    state = create_train_state(cfg, random_model(arch, Numerics(attention="cudnn"), mesh), mesh)
    mask = np.ones((4, 12), bool)
    mask[2, 5] = False  # padding between prompt (0..5) and response (6..11)
    batch = {"input_ids": np.zeros((4, 12), np.int32), "attention_mask": mask,
             "response_mask": np.ones((4, 6), np.float32), "old_logp": np.zeros((4, 6), np.float32),
             "ref_logp": np.zeros((4, 6), np.float32), "rhat": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"train_step\[flowrl\]: attention_mask row 2"):
        make_train_step(cfg, state, mesh).place(batch)
    with pytest.raises(ValueError, match="compute_logprobs: attention_mask row 2"):
        LogProbs(cfg, state, mesh)(state.params, batch)
    # the default kernel takes any mask
    ok = dataclasses.replace(cfg, model=ModelConfig(attention="xla"))
    assert make_train_step(ok, state, mesh).place(batch)["attention_mask"].shape == (4, 12)


def test_bench_attention_rows_compare_each_kernel_with_the_float32_reference():
    import argparse

    from flowrl_jax.bench import attention as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rows = bench.run(parser.parse_args(["--batch", "2", "--seq", "96", "--heads", "4",
                                        "--head-dim", "16", "--repeats", "1"]))
    assert [r["kernel"] for r in rows] == list(bench.KERNELS)
    xla = rows[0]["ours"]
    for r in rows:
        assert r["finite"] and r["rel_err_out"] < 1e-5 and r["rel_err_grad"] < 1e-5, r
        assert r["reference"] == xla and r["ratio"] == pytest.approx(xla / r["ours"])
    with pytest.raises(ValueError, match="'flash9'"):
        bench.run(parser.parse_args(["--kernels", "xla,flash9"]))


def test_rotation_gradient_is_a_gather_not_a_scatter():
    """Rows are permuted, so the backward is the inverse permutation (a gather); autodiff of
    the forward gather would emit a scatter-add, which GPUs run with atomics."""
    from flowrl_jax.models.attention import rotate

    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    by = jnp.asarray([1, 3])
    np.testing.assert_array_equal(np.asarray(rotate(jnp.asarray(x), by)),
                                  np.stack([np.roll(x[0], -1, 0), np.roll(x[1], -3, 0)]))
    q = jnp.ones((2, 16, 4, 8))
    k = jnp.ones((2, 16, 2, 8))
    valid = jnp.asarray(_rows(16)[:2])
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(contiguous_causal_attention(q, k, v, valid)),
                            argnums=(0, 1, 2)))
    assert "scatter" not in grad.lower(q, k, k).as_text()


def test_a_refused_fused_kernel_falls_back_to_xla_with_a_warning(monkeypatch):
    """cuDNN refuses some shapes / versions when tracing; the path then computes the same
    function through XLA and says so (here: cuDNN asked for on a CPU)."""
    from flowrl_jax.models import attention

    monkeypatch.setattr(attention, "fused_kernel_for", lambda dtype: "cudnn")
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(5, 24, h, 8)), jnp.float32) for h in (4, 2, 2))
    valid = jnp.asarray(_rows(24))
    with pytest.warns(RuntimeWarning, match="cuDNN attention unavailable"):
        out = attention.contiguous_causal_attention(q, k, v, valid)
    ref = attention.contiguous_causal_attention(q, k, v, valid, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(Exception):  # an explicitly requested kernel is not replaced
        attention.contiguous_causal_attention(q, k, v, valid, implementation="cudnn")


def test_layout_check_of_a_sharded_mask_names_the_global_row():
    from flowrl_jax.config import MeshConfig
    from flowrl_jax.mesh import make_mesh
    from flowrl_jax.rl.forward import check_attention_layout

    mesh = make_mesh(MeshConfig(data=8), jax.devices()[:8])
    mask = np.ones((16, 10), bool)
    mask[13, 4] = False  # in the 7th of 8 shards (rows 12-13)
    sharded = jax.device_put(mask, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert len(sharded.addressable_shards) == 8
    cfg = type("Cfg", (), {"model": ModelConfig(attention="cudnn")})()
    with pytest.raises(ValueError, match="where: attention_mask row 13 "):
        check_attention_layout(cfg, {"attention_mask": sharded}, "where")
    good = np.ones((16, 10), bool)
    good[::3, :4] = False  # left-padded prompts: one run per row
    check_attention_layout(cfg, {"attention_mask": jax.device_put(good, sharded.sharding)}, "ok")
