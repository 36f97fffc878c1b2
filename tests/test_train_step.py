"""The jitted train step: sharded == single device, micro-batch accumulation == one big
batch, non-finite guard, every algorithm learns on a repeated batch, and the no-grad
log-prob pass against a full-logits float64 reference.

Tolerances (float32, highest matmul precision): loss and gradient norms 1e-5 relative;
parameter *updates* (new − old, so the check is not swamped by the params themselves)
1e-4 relative + 1e-4·lr absolute. The tests use Adam eps = 1 so that an update reflects
the gradient's value, not just its sign.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from flowrl_jax.algos import base, get_algorithm, register
from flowrl_jax.config import (AlgoConfig, Config, MeshConfig, ModelArch, OptimizerConfig,
                               RolloutConfig, TrainerConfig)
from flowrl_jax.mesh import make_mesh, single_device_mesh
from flowrl_jax.checkpoint.load import random_model
from flowrl_jax.models.qwen2 import Numerics
from flowrl_jax.rl.train_state import create_train_state
from flowrl_jax.rl.forward import to_micro
from flowrl_jax.rl.logprobs import LogProbs
from flowrl_jax.rl.train_step import TrainStep, make_train_step

TINY = ModelArch(**yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "flowrl_jax/configs/models/tiny.yaml").read_text()))
B, P, R = 16, 6, 6
LR = 1e-3
TEMP = 0.7


def make_cfg(name: str, micro: int) -> Config:
    return Config(
        algo=AlgoConfig(name=name, z_dropout=0.0),  # dropout off: runs are compared exactly
        # eps = 1: Adam's first update is lr·g/(|g| + 1), i.e. sensitive to the gradient's
        # value (with eps = 1e-8 it would be lr·sign(g) and hide wrong gradients)
        optimizer=OptimizerConfig(lr=LR, eps=1.0, warmup_steps=0, weight_decay=0.1),
        trainer=TrainerConfig(mini_batch_size=B, micro_batch_size=micro,
                              logprob_micro_batch_size=8),
        rollout=RolloutConfig(prompts_per_step=4, samples_per_prompt=4, temperature=TEMP))


MESHES = {}


def mesh_of(kind: str):
    if kind not in MESHES:
        MESHES[kind] = (single_device_mesh() if kind == "1" else
                        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    return MESHES[kind]


INIT = {}


def fresh_state(cfg: Config, mesh_kind: str):
    """A new TrainState (new buffers) from the same seed-0 policy weights every time."""
    if "policy" not in INIT:
        model = random_model(TINY, Numerics(), single_device_mesh(), seed=0)
        gd, st = nnx.split(model)
        INIT["policy"] = (gd, jax.tree.map(np.asarray, st))
    gd, st = INIT["policy"]
    model = nnx.merge(gd, jax.tree.map(jnp.asarray, st))
    return create_train_state(cfg, model, mesh_of(mesh_kind), rng=0)


STEPS = {}


def train_step(name: str, micro: int, mesh_kind: str, state) -> TrainStep:
    """Compiled steps are shared across tests (one compile per algorithm/micro/mesh)."""
    key = (name, micro, mesh_kind)
    if key not in STEPS:
        STEPS[key] = make_train_step(make_cfg(name, micro), state, mesh_of(mesh_kind))
    return STEPS[key]


LOGPROBS = {}


def logprobs(cfg: Config, state, mesh_kind: str) -> LogProbs:
    key = (mesh_kind, tuple(state.params))
    if key not in LOGPROBS:
        LOGPROBS[key] = LogProbs(cfg, state, mesh_of(mesh_kind), with_entropy=True)
    return LOGPROBS[key]


def raw_batch(seed: int = 0) -> dict:
    """Left-padded prompts ++ right-padded responses of uneven lengths; rows 4k (which the
    strided split puts into micro-batch 0) are short, and row 8 has no valid response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, (B, P + R)).astype(np.int32)
    am = np.zeros((B, P + R), bool)
    for i in range(B):
        plen = int(rng.integers(2, P + 1))
        rlen = 0 if i == 8 else (int(rng.integers(1, 3)) if i % 4 == 0 else int(rng.integers(3, R + 1)))
        am[i, P - plen:P + rlen] = True
    ids = np.where(am, ids, 0)
    return {"input_ids": ids, "attention_mask": am, "response_mask": am[:, P:].astype(np.float32),
            "rewards": rng.choice([-1.0, 1.0], B).astype(np.float32),
            "group_ids": (np.arange(B) // 4).astype(np.int32)}


def full_batch(cfg: Config, state, mesh_kind: str = "1", seed: int = 0) -> dict:
    """raw_batch + old/ref log-probs (and old values) + the algorithm's advantages."""
    batch = raw_batch(seed)
    out = logprobs(cfg, state, mesh_kind)(state.params, batch)
    batch["old_logp"] = np.asarray(out["logp"])
    noise = np.random.default_rng(seed + 1).normal(0, 0.05, batch["old_logp"].shape)
    batch["ref_logp"] = (batch["old_logp"] + noise).astype(np.float32)
    if "values" in out:
        batch["old_values"] = np.asarray(out["values"])
    algo = get_algorithm(cfg.algo.name)
    batch.update({k: np.asarray(v) for k, v in algo.advantages(batch, cfg.algo).items()})
    return batch


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def run_one(name: str, micro: int, mesh_kind: str, batch=None):
    """(params before, metrics, params after, batch) of one step from a fresh state."""
    cfg = make_cfg(name, micro)
    state = fresh_state(cfg, mesh_kind)
    if batch is None:
        batch = full_batch(cfg, state)
    step = train_step(name, micro, mesh_kind, state)
    before = host(state.params)
    state, metrics = step(state, batch)
    return before, host(metrics), host(state.params), batch, state


def assert_same_update(a, b):
    (before_a, m_a, after_a), (before_b, m_b, after_b) = a, b
    for k in ("loss", "grad_norm", "grad_norm_policy"):
        np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-5, err_msg=k)
    flat = lambda t: jax.tree.leaves(t)  # noqa: E731
    for x0, x1, y0, y1 in zip(flat(before_a), flat(after_a), flat(before_b), flat(after_b)):
        np.testing.assert_array_equal(x0, y0)  # same start
        np.testing.assert_allclose(x1 - x0, y1 - y0, rtol=1e-4, atol=1e-4 * LR)


@pytest.fixture(scope="module")
def flowrl_single():
    """The reference run: FlowRL, 4 micro-batches, one device."""
    before, m, after, batch, _ = run_one("flowrl", 4, "1")
    return before, m, after, batch


def test_sharded_step_matches_single_device(flowrl_single):
    before, m1, after, batch = flowrl_single
    before8, m8, after8, _, state8 = run_one("flowrl", 4, "8", batch)
    # the 8-device run really is sharded over data, fsdp and tensor
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state8.params["policy"])}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    assert len(state8.params["policy"]["embed_tokens"][...].sharding.device_set) == 8
    # Adam moments live in their params' shardings
    pspec = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state8.params)}
    matched = 0
    for p, x in jax.tree_util.tree_leaves_with_path(state8.opt_state):
        ks = jax.tree_util.keystr(p)
        hits = [s for k, s in pspec.items() if ks.endswith(k)]
        if hits and x.ndim:
            assert x.sharding.spec == hits[0], ks
            matched += 1
    assert matched >= 2 * len(pspec)  # mu and nu of every param
    np.testing.assert_allclose(m8["grad_norm_z"], m1["grad_norm_z"], rtol=1e-5)
    assert_same_update((before, m1, after), (before8, m8, after8))
    assert m1["skipped"] == 0 and m1["step"] == 1 and m1["loss"] > 0


@pytest.mark.parametrize("name", ["flowrl", "grpo"])
def test_accumulation_equals_one_big_batch(flowrl_single, name):
    if name == "flowrl":
        before4, m4, after4, batch = flowrl_single
    else:
        before4, m4, after4, batch, _ = run_one(name, 4, "1")
    before1, m1, after1, _, _ = run_one(name, B, "1", batch)
    assert_same_update((before4, m4, after4), (before1, m1, after1))
    # the micro-batches are uneven, so a naive mean of micro-batch losses would differ:
    unit_tok = name != "flowrl"
    mask = to_micro(jnp.asarray(batch["response_mask"]), 4)
    units = np.asarray(mask.sum(-1).sum(-1) if unit_tok else (mask.sum(-1) > 0).sum(-1))
    assert len(set(units.tolist())) > 1
    assert m4["tokens"] == m1["tokens"] == batch["response_mask"].sum()
    assert m4["seqs"] == m1["seqs"] == B - 1


class _SeqMean(base.Algorithm):
    """A sequence-mean loss under a name the train step has never heard of."""

    @classmethod
    def loss_unit(cls, cfg):
        return "seqs"

    @classmethod
    def advantages(cls, batch, cfg):
        return {}

    @classmethod
    def loss(cls, cfg, batch, outputs):
        mask = base.response_mask(batch, "_test_seqmean")
        valid = base.seq_valid(batch, mask).astype(jnp.float32)
        per_seq = jnp.sum(outputs["logp"] * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return -jnp.sum(per_seq * batch["rewards"] * valid) / jnp.maximum(jnp.sum(valid), 1.0), {}


def test_accumulation_follows_the_declared_loss_unit():
    """A new sequence-mean algorithm is weighted by sequences because it says so (the step
    tests no algorithm name): with token weights its uneven micro-batches would differ."""
    register("_test_seqmean")(_SeqMean)
    try:
        before4, m4, after4, batch, _ = run_one("_test_seqmean", 4, "1")
        before1, m1, after1, _, _ = run_one("_test_seqmean", B, "1", batch)
    finally:
        base._REGISTRY.pop("_test_seqmean")
    assert_same_update((before4, m4, after4), (before1, m1, after1))


@pytest.mark.parametrize("poison", ["old_logp", "rhat"])
def test_non_finite_step_is_skipped_bit_exactly(flowrl_single, poison):
    cfg = make_cfg("flowrl", 4)
    state = fresh_state(cfg, "1")
    step = train_step("flowrl", 4, "1", state)
    batch = dict(flowrl_single[3])
    bad = dict(batch)
    bad[poison] = np.array(batch[poison], copy=True)
    if poison == "old_logp":
        bad[poison][3, 0] = np.nan  # a valid response token
    else:
        bad[poison][5] = np.nan
    before = host((state.params, state.opt_state))
    state, m = step(state, bad)
    after = host((state.params, state.opt_state))
    assert m["skipped"] == 1 and m["skipped_total"] == 1 and m["step"] == 0
    assert not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    # the state stays usable: a good batch is applied next
    state, m = step(state, batch)
    assert m["skipped"] == 0 and m["skipped_total"] == 1 and m["step"] == 1


@pytest.mark.parametrize("name", ["flowrl", "grpo", "ppo", "reinforce_pp"])
def test_each_algorithm_reduces_its_loss(name):
    cfg = make_cfg(name, 4)
    state = fresh_state(cfg, "1")
    batch = full_batch(cfg, state, seed=3)
    step = train_step(name, 4, "1", state)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        assert m["skipped"] == 0
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1e-3 * abs(losses[0]), losses
    if name == "ppo":
        assert "vf_loss" in m and "values" not in m


def _np_logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_compute_logprobs_matches_full_logits_reference():
    cfg = make_cfg("ppo", 4)  # PPO: also checks the value head
    state = fresh_state(cfg, "1")
    batch = raw_batch(5)
    batch = {k: v[:12] for k, v in batch.items()}  # 12 rows: padded to 16 for micro-batch 8
    out = logprobs(cfg, state, "1")(state.params, batch)
    model = state.module("policy")
    fwd = jax.jit(lambda m, ids, am: m(ids, am))
    res = fwd(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    logits = np.asarray(res.logits, np.float64)[:, P - 1:-1] / TEMP
    ref = _np_logsoftmax(logits)
    tgt = batch["input_ids"][:, P:]
    ref_lp = np.take_along_axis(ref, tgt[..., None], -1)[..., 0]
    ref_ent = -(np.exp(ref) * ref).sum(-1)
    m = batch["response_mask"] > 0
    assert out["logp"].shape == (12, R)
    np.testing.assert_allclose(np.asarray(out["logp"])[m], ref_lp[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["entropy"])[m], ref_ent[m], rtol=1e-5, atol=1e-5)
    head = state.params["value"]
    h = np.asarray(res.hidden, np.float64)[:, P - 1:-1]
    ref_v = h @ np.asarray(head["kernel"][...], np.float64)[:, 0] + float(head["bias"][...][0])
    np.testing.assert_allclose(np.asarray(out["values"])[m], ref_v[m], rtol=1e-5, atol=1e-5)
