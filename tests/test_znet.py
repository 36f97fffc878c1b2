"""Z_φ (SPEC §2): architecture against a NumPy float64 reference, masked pooling, dropout
only in training, and gradient into the transformer unless detach_z_input."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from flowrl_jax.config import Config, ModelArch
from flowrl_jax.mesh import single_device_mesh
from flowrl_jax.checkpoint.load import random_model
from flowrl_jax.models.qwen2 import Numerics
from flowrl_jax.models.znet import ZNet, masked_mean_pool
from flowrl_jax.rl.forward import forward

TINY = ModelArch(**yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "flowrl_jax/configs/models/tiny.yaml").read_text()))
H = TINY.hidden_size


def _znet(depth=2, dropout=0.1, detach=False, seed=0) -> ZNet:
    with nnx.use_eager_sharding(False):
        return ZNet(H, depth, dropout, detach, rngs=nnx.Rngs(seed))


def _np_znet(znet: ZNet, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Independent float64 reference: masked mean → [Linear → GELU(erf) → LayerNorm]×d → Linear."""
    from math import erf, sqrt

    m = mask.astype(np.float64)
    x = (hidden.astype(np.float64) * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    verf = np.vectorize(erf)
    for blk in znet.blocks:
        x = x @ np.asarray(blk.linear.kernel[...], np.float64) + np.asarray(blk.linear.bias[...])
        x = 0.5 * x * (1 + verf(x / sqrt(2)))
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        x = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(blk.norm.scale[...]) + np.asarray(blk.norm.bias[...])
    return (x @ np.asarray(znet.head.kernel[...], np.float64) + np.asarray(znet.head.bias[...]))[:, 0]


@pytest.mark.parametrize("depth", [0, 2, 3])
def test_znet_matches_numpy_reference(depth):
    rng = np.random.default_rng(depth)
    hidden = rng.normal(size=(5, 7, H)).astype(np.float32)
    mask = rng.random((5, 7)) < 0.7
    mask[:, -1] = True
    z = _znet(depth=depth)
    assert len(z.blocks) == depth
    got = np.asarray(z(jnp.asarray(hidden), jnp.asarray(mask), deterministic=True))
    np.testing.assert_allclose(got, _np_znet(z, hidden, mask), rtol=1e-5, atol=1e-5)


def test_masked_mean_ignores_padding_even_nan():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 6, H)).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], bool)
    poisoned = hidden.copy()
    poisoned[~mask] = np.nan  # padded positions must not matter at all
    pooled = np.asarray(masked_mean_pool(jnp.asarray(poisoned), jnp.asarray(mask)))
    ref = np.stack([hidden[i][mask[i]].astype(np.float64).mean(0) for i in range(3)])
    np.testing.assert_allclose(pooled, ref, rtol=1e-6, atol=1e-6)
    z = _znet()
    a = z(jnp.asarray(poisoned), jnp.asarray(mask))
    b = z(jnp.asarray(hidden), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropout_only_in_training():
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(4, 5, H)).astype(np.float32))
    mask = jnp.ones((4, 5), bool)
    z = _znet(dropout=0.5)
    e1 = z(hidden, mask, deterministic=True)
    e2 = z(hidden, mask, deterministic=True, key=jax.random.PRNGKey(9))
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    t1 = z(hidden, mask, deterministic=False, key=jax.random.PRNGKey(1))
    t2 = z(hidden, mask, deterministic=False, key=jax.random.PRNGKey(2))
    t1b = z(hidden, mask, deterministic=False, key=jax.random.PRNGKey(1))
    assert np.all(np.asarray(t1) != np.asarray(t2))
    assert not np.allclose(np.asarray(t1), np.asarray(e1))
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))  # same key, same mask
    with pytest.raises(ValueError, match="key"):
        z(hidden, mask, deterministic=False)


@pytest.fixture(scope="module")
def policy():
    model = random_model(TINY, Numerics(), single_device_mesh(), seed=0)
    return nnx.split(model)


def _batch(pad_left: int):
    """One prompt (left-padded by pad_left) ++ a 4-token response."""
    prompt, resp = [5, 17, 9, 33, 8], [40, 41, 42, 43]
    ids = np.array([[0] * pad_left + prompt + resp], np.int32)
    am = np.array([[0] * pad_left + [1] * (len(prompt) + len(resp))], bool)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(am),
            "response_mask": jnp.ones((1, len(resp)), jnp.float32)}


def test_log_z_ignores_left_padding_end_to_end(policy):
    """Same prompt with 0 or 3 pad tokens: identical log Z (padding neither pooled nor attended)."""
    gd, st = policy
    z = _znet(dropout=0.1)
    zgd, zst = nnx.split(z)
    params, gds = {"policy": st, "z": zst}, {"policy": gd, "z": zgd}
    f = jax.jit(lambda p, b: forward(Config(), gds, p, b)["log_z"])
    a, b = f(params, _batch(0)), f(params, _batch(3))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_log_z_gradient_reaches_transformer_unless_detached(policy, detach):
    gd, st = policy
    z = _znet(dropout=0.0, detach=detach)
    zgd, zst = nnx.split(z)
    gds = {"policy": gd, "z": zgd}
    batch = _batch(2)

    def log_z_sum(pol, zp):
        return jnp.sum(forward(Config(), gds, {"policy": pol, "z": zp}, batch, train=True,
                               key=jax.random.PRNGKey(0))["log_z"])

    g_pol, g_z = jax.jit(jax.grad(log_z_sum, argnums=(0, 1)))(st, zst)
    pol_norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g_pol))))
    z_norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g_z))))
    assert z_norm > 0  # Z_φ itself always learns
    if detach:
        assert pol_norm == 0.0
    else:
        assert pol_norm > 1e-6


def test_znet_params_carry_logical_axes():
    st = nnx.state(_znet(depth=1), nnx.Param)
    axes = {".".join(map(str, k)): v.get_metadata().get("logical_axes")
            for k, v in nnx.to_flat_state(st)}
    assert axes["blocks.0.linear.kernel"] == ("z_hidden", "z_hidden")
    assert axes["head.kernel"] == ("z_hidden", None)
    assert all(a is not None for a in axes.values())


# --------------------------------------------------------------------------- official details


def _pool_forward(z_pool: str):
    from flowrl_jax.config import AlgoConfig

    return Config(algo=AlgoConfig(z_pool=z_pool))


@pytest.mark.parametrize("z_pool", ["prompt", "prompt_but_last"])
def test_z_pool_keeps_or_drops_the_last_prompt_token(policy, z_pool):
    """`prompt_but_last` (the official slice) pools prompt tokens 0..P−2: the last prompt token
    cannot change log Z (attention is causal), and log Z is Z_φ of the mean hidden state of
    the other prompt tokens; `prompt` pools all of them."""
    gd, st = policy
    z = _znet(dropout=0.0)
    zgd, zst = nnx.split(z)
    params, gds = {"policy": st, "z": zst}, {"policy": gd, "z": zgd}
    cfg = _pool_forward(z_pool)
    f = jax.jit(lambda p, b: forward(cfg, gds, p, b)["log_z"])
    batch = _batch(2)
    other = dict(batch, input_ids=batch["input_ids"].at[0, 6].set(77))  # last prompt token
    a, b = np.asarray(f(params, batch)), np.asarray(f(params, other))
    if z_pool == "prompt_but_last":
        np.testing.assert_array_equal(a, b)
    else:
        assert np.all(a != b)
    hidden = np.asarray(nnx.merge(gd, st)(batch["input_ids"], batch["attention_mask"], None,
                                          return_logits=False).hidden)
    n = 4 if z_pool == "prompt_but_last" else 5  # real prompt tokens pooled (columns 2..)
    mask = np.zeros((1, 7), bool)
    mask[0, 2:2 + n] = True
    np.testing.assert_allclose(a, _np_znet(z, hidden[:, :7], mask), rtol=2e-5, atol=2e-5)


def test_biases_start_like_torch_linear():
    """U(±1/√fan_in) for every Linear bias (torch's default), LayerNorm bias 0 and scale 1."""
    z = _znet(depth=2, seed=3)
    bound = 1.0 / np.sqrt(H)
    for lin in [blk.linear for blk in z.blocks] + [z.head]:
        b = np.asarray(lin.bias[...])
        assert np.all(np.abs(b) <= bound)
    b = np.concatenate([np.asarray(blk.linear.bias[...]) for blk in z.blocks])
    assert b.max() > 0.5 * bound and b.min() < -0.5 * bound  # spread over the range, not 0
    assert abs(float(np.asarray(z.head.bias[...])[0])) > 0
    for blk in z.blocks:
        np.testing.assert_array_equal(np.asarray(blk.norm.bias[...]), 0.0)
        np.testing.assert_array_equal(np.asarray(blk.norm.scale[...]), 1.0)


def test_z_depth_counts_hidden_blocks():
    """z_depth 2 = the paper's "3-layer MLP" (official ProjZModule(num_layers=3)): 3 Linears."""
    from flowrl_jax.models.znet import ZLinear

    for depth in (0, 2, 3):
        lins = [m for _, m in nnx.iter_graph(_znet(depth=depth)) if isinstance(m, ZLinear)]
        assert len(lins) == depth + 1


@pytest.mark.parametrize("log_z", ["zero", "scalar"])
def test_log_z_ablations_train(log_z):
    """`log_z: zero` builds no Z module and logs log Z 0; `scalar` learns one value shared by
    every prompt (starts at 0) and leaves the rest of the step as it is."""
    from flowrl_jax.bench import train as bench
    from flowrl_jax.config import AlgoConfig, ModelConfig, OptimizerConfig, TrainerConfig
    from flowrl_jax.rl.train_state import create_train_state
    from flowrl_jax.rl.train_step import make_train_step

    cfg = Config(model=ModelConfig(), algo=AlgoConfig(name="flowrl", log_z=log_z),
                 optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0),
                 trainer=TrainerConfig(mini_batch_size=4, micro_batch_size=2))
    mesh = single_device_mesh()
    state = create_train_state(cfg, random_model(TINY, Numerics(), mesh, seed=0), mesh, rng=0)
    if log_z == "zero":
        assert "z" not in state.params
    else:
        leaves = jax.tree.leaves(state.params["z"])
        assert len(leaves) == 1 and leaves[0].shape == () and float(leaves[0]) == 0.0
    step = make_train_step(cfg, state, mesh)
    batch = bench._inputs(TINY, 4, 6, 6)
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))
    if log_z == "zero":
        assert float(m["log_z_mean"]) == 0.0 and "grad_norm_z" not in m
    else:
        assert float(m["log_z_mean"]) == 0.0 and float(m["grad_norm_z"]) > 0
        new = float(jax.tree.leaves(state.params["z"])[0])
        assert new != 0.0
        _, m2 = step(state, batch)
        np.testing.assert_allclose(float(m2["log_z_mean"]), new, rtol=1e-6)
