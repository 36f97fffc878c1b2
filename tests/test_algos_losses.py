"""Every loss and advantage estimator against an independent float64 NumPy implementation
(values and gradients), plus hand-made cases: importance-weight clip modes, overflow guard,
NaN-free padding, registry and error messages."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl_jax.algos import base, get_algorithm, list_algorithms, register
from flowrl_jax.algos.base import Algorithm
from flowrl_jax.config import AlgoConfig

B, T = 6, 7
LENGTHS = np.array([7, 3, 1, 5, 0, 7])  # row 4 is a padding row (n_i = 0)
GARBAGE = 37.0  # value left in masked positions: must not influence anything


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def make_data(seed=0, garbage=GARBAGE):
    """Random padded batch in float64 (NumPy)."""
    rng = np.random.default_rng(seed)
    m = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float64)
    lp = -rng.uniform(0.05, 3.0, size=(B, T))
    old = lp + rng.normal(0, 0.3, size=(B, T))
    old[0] -= 0.5  # row 0: log w = Σ(lp − old) ≈ 3.5 → w ≈ 33, hits the cap of 10
    ref = lp + rng.normal(0, 0.4, size=(B, T))
    old_v = rng.normal(size=(B, T))
    values = old_v + rng.normal(0, 0.3, size=(B, T))
    d = dict(
        response_mask=m,
        logp=np.where(m > 0, lp, garbage), old_logp=np.where(m > 0, old, garbage),
        ref_logp=np.where(m > 0, ref, garbage),
        log_z=rng.normal(size=B), rewards=np.array([1.0, -1.0, 1.0, 0.5, 0.0, -0.5]),
        group_ids=np.array([0, 0, 0, 1, 1, 1]),
        old_values=np.where(m > 0, old_v, garbage), values=np.where(m > 0, values, garbage),
        advantages=np.where(m > 0, rng.normal(size=(B, T)), garbage),
        returns=np.where(m > 0, rng.normal(size=(B, T)), garbage),
    )
    return d


OUT_KEYS = ("logp", "log_z", "values")


def split(d):
    """(batch, outputs) dicts of jnp arrays."""
    outputs = {k: jnp.asarray(d[k]) for k in OUT_KEYS if k in d}
    batch = {k: jnp.asarray(v) for k, v in d.items() if k not in OUT_KEYS}
    return batch, outputs


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a scalar NumPy function (float64)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def close(a, b, rtol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1e-12, float(np.abs(b).max())))


# --------------------------------------------------------------------------- NumPy references


def np_group_norm(r, gid, valid):
    """SPEC §3 over the valid rows of each group; padding rows get 0."""
    out = np.zeros_like(r)
    for g in np.unique(gid):
        sel = (gid == g) & valid
        x = r[sel]
        if len(x) == 1:
            out[sel] = x / (1 + 1e-6)
        elif np.all(x == x[0]):
            out[sel] = 0.0
        else:
            out[sel] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
    return out


def np_flowrl(lp, old, ref, lz, rh, m, beta, mode, eps=0.2, eps_hi=0.28, cap=10.0, clamp=20.0,
              one=False, length_norm=True):
    """Loss, d/d logp, d/d log_z (analytic), weights and clip flags of SPEC §1 (`one`: w ≡ 1;
    `length_norm=False`: sums instead of per-token means in δ)."""
    n = m.sum(1)
    valid = n > 0
    ns = np.maximum(n, 1) if length_norm else np.ones_like(n)
    z = lambda x: np.where(m > 0, x, 0.0)  # noqa: E731
    delta = lz + z(lp).sum(1) / ns - beta * rh - z(ref).sum(1) / ns
    logw = z(lp - old).sum(1)
    w0 = np.exp(np.clip(logw, -clamp, clamp))
    w = {"paper": np.clip(w0, 1 - eps, 1 + eps), "cap": np.minimum(w0, cap),
         "asym": np.clip(w0, 1 - eps, 1 + eps_hi), "none": w0}[mode]
    if one:
        w = np.ones_like(w0)
    nv = valid.sum()
    loss = (w * delta ** 2)[valid].sum() / nv
    coef = np.where(valid, 2 * w * delta, 0.0) / nv
    g_lp = (coef / ns)[:, None] * m
    g_lz = coef
    clipped = ((w != w0) | (np.abs(logw) > clamp))[valid]
    return loss, g_lp, g_lz, w[valid], clipped


def np_surrogate(lp, old, adv, m, lo=0.2, hi=0.2, dual=None):
    r = np.exp(np.clip(lp - old, -20, 20))
    l1, l2 = -adv * r, -adv * np.clip(r, 1 - lo, 1 + hi)
    pg = np.maximum(l1, l2)
    if dual is not None:
        pg = np.where(adv < 0, np.minimum(pg, -adv * dual), pg)
    return np.where(m > 0, pg, 0).sum() / m.sum()


def np_k3(lp, ref):
    x = np.clip(ref - lp, -20, 20)
    return np.clip(np.exp(x) - x - 1, -10, 10)


def np_gae(r_last, v, m, gamma, lam):
    """Per-sequence GAE over the valid positions only (skipping holes), then batch whitening."""
    adv = np.zeros_like(v)
    for i in range(v.shape[0]):
        idx = np.flatnonzero(m[i])
        g = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            r = r_last[i] if k == len(idx) - 1 else 0.0
            nv = v[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
            g = r + gamma * nv - v[i, t] + gamma * lam * g
            adv[i, t] = g
    ret = np.where(m > 0, adv + v, 0.0)
    x = adv[m > 0]
    white = np.where(m > 0, (adv - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0)
    return white, ret


def np_rpp(r_last, m, gamma, old=None, ref=None, coef=0.0):
    """REINFORCE++ returns (veRL loop: reset after masked positions) and whitened advantages."""
    tok = np.zeros_like(m)
    for i in range(m.shape[0]):
        idx = np.flatnonzero(m[i])
        if len(idx):
            tok[i, idx[-1]] = r_last[i]
    if coef:
        tok = tok - coef * np.where(m > 0, old - ref, 0.0)
    ret = np.zeros_like(m)
    run = np.zeros(m.shape[0])
    for t in reversed(range(m.shape[1])):
        run = tok[:, t] + gamma * run
        ret[:, t] = run
        run = run * m[:, t]
    ret = ret * m
    x = ret[m > 0]
    return np.where(m > 0, (ret - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0), ret


# --------------------------------------------------------------------------- FlowRL


@pytest.mark.parametrize("mode", ["cap", "paper", "asym", "none"])
def test_flowrl_loss_and_grads_vs_numpy(mode):
    d = make_data(1)
    m = d["response_mask"]
    rh = np_group_norm(d["rewards"], d["group_ids"], LENGTHS > 0)
    assert rh[4] == 0.0  # padding row
    cfg = AlgoConfig(name="flowrl", beta=15.0, is_clip=mode)
    algo = get_algorithm("flowrl")
    batch, outputs = split(d)
    batch.update(algo.advantages(batch, cfg))
    close(np.asarray(batch["rhat"]), rh, rtol=1e-10)

    loss_fn = jax.jit(partial(algo.loss, cfg))
    (loss, metrics), grads = jax.value_and_grad(lambda o: loss_fn(batch, o), has_aux=True)(outputs)
    ref_loss, g_lp, g_lz, w, clipped = np_flowrl(d["logp"], d["old_logp"], d["ref_logp"],
                                                 d["log_z"], rh, m, 15.0, mode)
    close(loss, ref_loss)
    close(grads["logp"], g_lp)
    close(grads["log_z"], g_lz)
    close(metrics["w_mean"], w.mean())
    close(metrics["clip_frac"], clipped.mean())
    # the sequence-mean metrics skip the padding row
    valid = LENGTHS > 0
    z = np.where(m > 0, d["logp"], 0).sum(1)
    close(metrics["response_length"], LENGTHS[valid].mean())
    close(metrics["log_z_mean"], d["log_z"][valid].mean())
    delta = (d["log_z"] + z / np.maximum(LENGTHS, 1) - 15 * rh
             - np.where(m > 0, d["ref_logp"], 0).sum(1) / np.maximum(LENGTHS, 1))[valid]
    close(metrics["delta_mean"], delta.mean())
    close(metrics["delta_std"], delta.std())
    x = (d["ref_logp"] - d["logp"])[m > 0]
    close(metrics["kl_ref"], np.mean(np.exp(x) - x - 1))
    x = (d["logp"] - d["old_logp"])[m > 0]
    close(metrics["kl_old"], np.mean(np.exp(x) - x - 1))
    if mode == "cap":
        assert 0 < float(metrics["clip_frac"]) < 1  # row 0 is capped, others not


def test_flowrl_reward_norm_none_uses_raw_reward():
    d = make_data(9)
    batch, _ = split(d)
    got = get_algorithm("flowrl").advantages(batch, AlgoConfig(reward_norm="none"))["rhat"]
    close(got, np.where(LENGTHS > 0, d["rewards"], 0.0), rtol=1e-12)
    with pytest.raises(ValueError, match="reward_norm"):
        get_algorithm("flowrl").advantages(batch, dataclasses.replace(AlgoConfig(),
                                                                      reward_norm="zscore"))


def test_flowrl_clip_modes_hand_cases():
    # one token per sequence, log w = logp − old chosen so w is known; δ = 1 for every row
    w_raw = np.array([0.5, 0.9, 1.1, 1.25, 5.0, 20.0])
    m = np.ones((6, 1))
    old = np.full((6, 1), -2.0)
    lp = old + np.log(w_raw)[:, None]
    ref = np.full((6, 1), -1.0)
    rh = np.linspace(-1, 1, 6)
    beta = 15.0
    lz = 1.0 - lp[:, 0] + beta * rh + ref[:, 0]
    batch = dict(response_mask=jnp.asarray(m), old_logp=jnp.asarray(old), ref_logp=jnp.asarray(ref),
                 rhat=jnp.asarray(rh))
    outputs = dict(logp=jnp.asarray(lp), log_z=jnp.asarray(lz))
    expected = {
        "paper": ([0.8, 0.9, 1.1, 1.2, 1.2, 1.2], 4 / 6),
        "cap": ([0.5, 0.9, 1.1, 1.25, 5.0, 10.0], 1 / 6),
        "asym": ([0.8, 0.9, 1.1, 1.25, 1.28, 1.28], 3 / 6),
        "none": (list(w_raw), 0.0),
    }
    for mode, (w, frac) in expected.items():
        cfg = AlgoConfig(is_clip=mode, beta=beta)
        loss, met = get_algorithm("flowrl").loss(cfg, batch, outputs)
        close(loss, np.mean(w), rtol=1e-9)  # loss = mean(w · 1²)
        close(met["w_mean"], np.mean(w), rtol=1e-9)
        close(met["clip_frac"], frac, rtol=1e-12)
        close(met["delta_mean"], 1.0, rtol=1e-9)


def _ablation_case():
    """Two sequences with hand-picked numbers (β = 10):
    row A: 2 tokens, ℓθ = (−1, −3), ℓold = (−1.5, −3.5) → log w = 1, ℓref = (−1, −1),
           r̂ = 0.1, log Z = 0.5: δ = 0.5 − 2 − 1 + 1 = −1.5 (means), 0.5 − 4 − 1 + 2 = −2.5 (sums);
    row B: 1 token, ℓθ = ℓold = −0.5 → w = 1, ℓref = −1, r̂ = −0.2, log Z = 0:
           δ = 0 − 0.5 + 2 + 1 = 2.5 either way."""
    m = np.array([[1.0, 1.0], [1.0, 0.0]])
    batch = dict(response_mask=jnp.asarray(m),
                 old_logp=jnp.asarray([[-1.5, -3.5], [-0.5, GARBAGE]]),
                 ref_logp=jnp.asarray([[-1.0, -1.0], [-1.0, GARBAGE]]),
                 rhat=jnp.asarray([0.1, -0.2]))
    outputs = dict(logp=jnp.asarray([[-1.0, -3.0], [-0.5, GARBAGE]]),
                   log_z=jnp.asarray([0.5, 0.0]))
    return batch, outputs


# (importance_weight, length_norm, log_z) → (δ_A, δ_B, w_A): loss = (w_A δ_A² + δ_B²) / 2
ABLATIONS = {
    ("clipped", True, "network"): (-1.5, 2.5, np.e),
    ("one", True, "network"): (-1.5, 2.5, 1.0),
    ("clipped", False, "network"): (-2.5, 2.5, np.e),
    ("one", False, "network"): (-2.5, 2.5, 1.0),
    ("clipped", True, "zero"): (-2.0, 2.5, np.e),  # log Z ≡ 0: δ − log Z
    ("one", False, "zero"): (-3.0, 2.5, 1.0),
}


@pytest.mark.parametrize("iw,norm,log_z", list(ABLATIONS), ids=lambda x: str(x))
def test_flowrl_ablation_switches_hand_cases(iw, norm, log_z):
    d_a, d_b, w_a = ABLATIONS[(iw, norm, log_z)]
    batch, outputs = _ablation_case()
    if log_z == "zero":
        outputs.pop("log_z")  # no Z-network: the loss must not need its output
    cfg = AlgoConfig(beta=10.0, importance_weight=iw, length_norm=norm, log_z=log_z)
    (loss, met), g = jax.value_and_grad(partial(get_algorithm("flowrl").loss, cfg), argnums=1,
                                        has_aux=True)(batch, outputs)
    close(loss, (w_a * d_a ** 2 + d_b ** 2) / 2, rtol=1e-12)
    close(met["w_mean"], (w_a + 1.0) / 2, rtol=1e-12)
    close(met["delta_mean"], (d_a + d_b) / 2, rtol=1e-12)
    close(met["log_z_mean"], 0.0 if log_z == "zero" else 0.25, rtol=1e-12)
    close(met["clip_frac"], 0.0, rtol=1e-12)  # e < cap; w ≡ 1 is never clipped
    # dloss/dℓθ_t = w δ / N per valid token, divided by the length when length-normalised
    n_a = 2.0 if norm else 1.0
    close(g["logp"], [[w_a * d_a / n_a, w_a * d_a / n_a], [d_b, 0.0]], rtol=1e-12)
    if log_z != "zero":
        close(g["log_z"], [w_a * d_a, d_b], rtol=1e-12)  # 2 w δ / N with N = 2


@pytest.mark.parametrize("iw,norm", [("one", True), ("clipped", False), ("one", False)])
def test_flowrl_ablations_vs_numpy(iw, norm):
    """The switches on the random padded batch: loss and gradients against float64 NumPy."""
    d = make_data(4)
    m = d["response_mask"]
    rh = np_group_norm(d["rewards"], d["group_ids"], LENGTHS > 0)
    cfg = AlgoConfig(name="flowrl", beta=15.0, importance_weight=iw, length_norm=norm)
    algo = get_algorithm("flowrl")
    batch, outputs = split(d)
    batch.update(algo.advantages(batch, cfg))
    (loss, met), grads = jax.value_and_grad(lambda o: algo.loss(cfg, batch, o), has_aux=True)(outputs)
    ref_loss, g_lp, g_lz, w, _ = np_flowrl(d["logp"], d["old_logp"], d["ref_logp"], d["log_z"],
                                           rh, m, 15.0, "cap", one=iw == "one", length_norm=norm)
    close(loss, ref_loss)
    close(grads["logp"], g_lp)
    close(grads["log_z"], g_lz)
    close(met["w_mean"], w.mean())
    if iw == "one":
        assert np.all(w == 1.0) and float(met["clip_frac"]) == 0.0


def test_flowrl_loss_signature_keeps_old_calls_valid():
    """Positional and keyword calls written before the switches give the paper's loss."""
    from flowrl_jax.algos.flowrl import flowrl_loss

    batch, outputs = _ablation_case()
    args = (outputs["logp"], batch["old_logp"], batch["ref_logp"], outputs["log_z"],
            batch["rhat"], batch["response_mask"], 10.0, "cap", 0.2, 0.28, 10.0, 20.0)
    loss, _ = flowrl_loss(*args)
    close(loss, (np.e * 1.5 ** 2 + 2.5 ** 2) / 2, rtol=1e-12)
    loss1, _ = flowrl_loss(*args, importance_weight="one", length_norm=False)
    close(loss1, (2.5 ** 2 + 2.5 ** 2) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="importance_weight"):
        flowrl_loss(*args, importance_weight="none")


@pytest.mark.parametrize("mode", ["none", "cap"])
@pytest.mark.parametrize("log_w", [1000.0, -1000.0])
def test_flowrl_overflow_guard_float32(mode, log_w):
    m = np.ones((2, 3), np.float32)
    old = np.full((2, 3), -1.0, np.float32)
    lp = old.copy()
    lp[0, 0] += log_w  # log w_0 = ±1000
    batch = dict(response_mask=jnp.asarray(m), old_logp=jnp.asarray(old),
                 ref_logp=jnp.asarray(old), rhat=jnp.asarray([1.0, -1.0], jnp.float32))
    outputs = dict(logp=jnp.asarray(lp), log_z=jnp.asarray([0.3, 0.2], jnp.float32))
    cfg = AlgoConfig(is_clip=mode)
    (loss, met), g = jax.value_and_grad(partial(get_algorithm("flowrl").loss, cfg), argnums=1,
                                        has_aux=True)(batch, outputs)
    assert loss.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    w0 = {("none", 1000.0): np.exp(np.float32(20.0)), ("cap", 1000.0): 10.0}.get(
        (mode, log_w), np.exp(-20.0))
    assert float(met["clip_frac"]) == 0.5  # the clamp counts as clipping
    close(met["w_mean"], (w0 + 1.0) / 2, rtol=1e-5)


# --------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("use_kl", [False, True])
def test_grpo_vs_numpy(use_kl):
    d = make_data(2)
    m = d["response_mask"]
    cfg = AlgoConfig(name="grpo", use_kl_loss=use_kl, kl_coef=0.05)  # larger coef: visible term
    algo = get_algorithm("grpo")
    assert algo.uses_ref(cfg) == use_kl
    batch, outputs = split(d)
    adv_out = algo.advantages(batch, cfg)
    rh = np_group_norm(d["rewards"], d["group_ids"], LENGTHS > 0)
    close(adv_out["advantages"], rh[:, None] * m, rtol=1e-10)
    batch.update(adv_out)
    adv = rh[:, None] * m

    def np_loss(lp):
        val = np_surrogate(lp, d["old_logp"], adv, m)
        if use_kl:
            val += 0.05 * np.where(m > 0, np_k3(lp, d["ref_logp"]), 0).sum() / m.sum()
        return val

    (loss, met), g = jax.value_and_grad(lambda o: jax.jit(partial(algo.loss, cfg))(batch, o),
                                        has_aux=True)(outputs)
    close(loss, np_loss(d["logp"]))
    close(g["logp"], fd_grad(np_loss, d["logp"]))
    r = np.exp(d["logp"] - d["old_logp"])
    clipped = (np.where(adv >= 0, r > 1.2, r < 0.8) & (adv != 0))[m > 0]
    close(met["pg_clip_frac"], clipped.mean())
    assert 0 < float(met["pg_clip_frac"]) < 1
    assert ("kl_loss" in met) == use_kl


def test_surrogate_asymmetric_and_dual_clip_vs_numpy():
    d = make_data(3)
    m = d["response_mask"]
    cfg = AlgoConfig(name="grpo", surrogate_clip_high=0.28, dual_clip_c=1.1)
    batch, outputs = split(d)  # uses the random 'advantages' of make_data directly
    np_loss = lambda lp: np_surrogate(lp, d["old_logp"], d["advantages"], m, 0.2, 0.28, 1.1)  # noqa
    (loss, _), g = jax.value_and_grad(partial(get_algorithm("grpo").loss, cfg), argnums=1,
                                      has_aux=True)(batch, outputs)
    close(loss, np_loss(d["logp"]))
    close(g["logp"], fd_grad(np_loss, d["logp"]))
    # and the dual clip really changes something on this data
    assert not np.isclose(np_loss(d["logp"]),
                          np_surrogate(d["logp"], d["old_logp"], d["advantages"], m, 0.2, 0.28))


# --------------------------------------------------------------------------- PPO


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_ppo_gae_vs_numpy(gamma, lam):
    d = make_data(4)
    m = d["response_mask"].copy()
    m[3, 2] = 0  # a hole inside a response: skipped, not a sequence end
    d["response_mask"] = m
    cfg = AlgoConfig(name="ppo", gamma=gamma, lam=lam)
    batch, _ = split(d)
    out = jax.jit(partial(get_algorithm("ppo").advantages, cfg=cfg))(batch)
    adv, ret = np_gae(d["rewards"], np.where(m > 0, d["old_values"], 0.0), m, gamma, lam)
    close(out["advantages"], adv, rtol=1e-9)
    close(out["returns"], ret, rtol=1e-9)


def test_ppo_loss_vs_numpy():
    d = make_data(5)
    m = d["response_mask"]
    cfg = AlgoConfig(name="ppo", value_clip=0.2, vf_coef=0.7)
    algo = get_algorithm("ppo")
    assert algo.needs_critic and not algo.needs_z
    batch, outputs = split(d)
    batch.update(algo.advantages(batch, cfg))
    adv = np.asarray(batch["advantages"])
    ret = np.asarray(batch["returns"])

    def np_vf(v):
        vc = np.clip(v, d["old_values"] - 0.2, d["old_values"] + 0.2)
        x = np.maximum((v - ret) ** 2, (vc - ret) ** 2)
        return 0.5 * np.where(m > 0, x, 0).sum() / m.sum()

    def np_loss(lp, v):
        return np_surrogate(lp, d["old_logp"], adv, m) + 0.7 * np_vf(v)

    (loss, met), g = jax.value_and_grad(partial(algo.loss, cfg), argnums=1, has_aux=True)(
        batch, outputs)
    close(loss, np_loss(d["logp"], d["values"]))
    close(met["vf_loss"], np_vf(d["values"]))
    close(g["logp"], fd_grad(lambda x: np_loss(x, d["values"]), d["logp"]))
    close(g["values"], fd_grad(lambda x: np_loss(d["logp"], x), d["values"]))
    assert 0 < float(met["vf_clip_frac"]) < 1


# --------------------------------------------------------------------------- REINFORCE++


@pytest.mark.parametrize("gamma,coef", [(1.0, 0.0), (0.95, 0.1)])
def test_reinforce_pp_vs_numpy(gamma, coef):
    d = make_data(6)
    m = d["response_mask"]
    cfg = AlgoConfig(name="reinforce_pp", gamma=gamma, kl_penalty_coef=coef)
    algo = get_algorithm("reinforce_pp")
    assert algo.uses_ref(cfg) == (coef > 0)
    batch, outputs = split(d)
    out = algo.advantages(batch, cfg)
    adv, ret = np_rpp(d["rewards"], m, gamma, d["old_logp"], d["ref_logp"], coef)
    close(out["advantages"], adv, rtol=1e-9)
    close(out["returns"], ret, rtol=1e-9)
    batch.update(out)
    np_loss = lambda lp: np_surrogate(lp, d["old_logp"], adv, m)  # noqa: E731
    (loss, _), g = jax.value_and_grad(partial(algo.loss, cfg), argnums=1, has_aux=True)(
        batch, outputs)
    close(loss, np_loss(d["logp"]))
    close(g["logp"], fd_grad(np_loss, d["logp"]))


# --------------------------------------------------------------------------- padding, registry


@pytest.mark.parametrize("name", ["flowrl", "grpo", "ppo", "reinforce_pp"])
def test_nan_in_padding_changes_nothing(name):
    cfg = AlgoConfig(name=name, use_kl_loss=True, kl_penalty_coef=0.01)
    algo = get_algorithm(name)
    res = []
    for garbage in (GARBAGE, np.nan):
        d = make_data(7, garbage=garbage)
        batch, outputs = split(d)
        if garbage != garbage:  # NaN run: also poison the padding row's scalars
            outputs["log_z"] = outputs["log_z"].at[4].set(jnp.nan)
            batch["rewards"] = batch["rewards"].at[4].set(jnp.nan)
        for k in ("advantages", "returns", "rhat"):
            batch.pop(k, None)
        batch.update(algo.advantages(batch, cfg))
        (loss, met), g = jax.value_and_grad(partial(algo.loss, cfg), argnums=1, has_aux=True)(
            batch, outputs)
        assert np.isfinite(float(loss)), name
        for k, v in met.items():
            assert np.isfinite(float(v)), (name, k)
        m = d["response_mask"] > 0
        res.append((float(loss), np.asarray(g["logp"])[m]))
        for v in jax.tree.leaves(g):
            assert np.all(np.isfinite(np.asarray(v))), name
    close(res[1][0], res[0][0], rtol=1e-12)
    close(res[1][1], res[0][1], rtol=1e-12)


def test_registry_and_interface():
    assert set(list_algorithms()) >= {"flowrl", "grpo", "ppo", "reinforce_pp"}
    f = get_algorithm("flowrl")
    assert f.needs_z and f.needs_ref and not f.needs_critic
    with pytest.raises(ValueError, match="unknown algorithm 'nope'.*flowrl"):
        get_algorithm("nope")

    @register("_test_fifth")
    class Fifth(Algorithm):
        @classmethod
        def advantages(cls, batch, cfg):
            return {"advantages": batch["response_mask"] * 2.0}

        @classmethod
        def loss(cls, cfg, batch, outputs):
            return -jnp.sum(outputs["logp"] * batch["advantages"]), {}

    try:
        assert get_algorithm("_test_fifth") is Fifth and Fifth.name == "_test_fifth"
        with pytest.raises(ValueError, match="already registered"):
            register("_test_fifth")(type("Other", (Algorithm,), {}))
    finally:
        base._REGISTRY.pop("_test_fifth")
    with pytest.raises(TypeError):
        register("x")(object)


@pytest.mark.parametrize("mode,unit", [("token-mean", "tokens"), ("seq-mean-token-mean", "seqs"),
                                       ("seq-mean-token-sum", "seqs")])
def test_each_algorithm_declares_its_loss_unit(mode, unit):
    cfg = AlgoConfig(loss_agg_mode=mode)
    assert get_algorithm("flowrl").loss_unit(cfg) == "seqs"  # a mean over sequences always
    for name in ("grpo", "ppo", "reinforce_pp"):
        assert get_algorithm(name).loss_unit(cfg) == unit, name


def test_clear_errors_name_the_culprit():
    d = make_data(8)
    batch, outputs = split(d)
    cfg = AlgoConfig()
    batch["rhat"] = jnp.zeros(B)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logp"}
    with pytest.raises(KeyError, match=r"flowrl.loss.*ref_logp"):
        get_algorithm("flowrl").loss(cfg, no_ref, outputs)
    bad = dict(outputs, logp=outputs["logp"][:, :-1])
    with pytest.raises(ValueError, match=r"outputs\['logp'\].*\(6, 6\)"):
        get_algorithm("flowrl").loss(cfg, batch, bad)
    with pytest.raises(ValueError, match="is_clip"):
        get_algorithm("flowrl").loss(dataclasses.replace(cfg, is_clip="bogus"), batch, outputs)
    with pytest.raises(KeyError, match=r"ppo.advantages.*old_values"):
        get_algorithm("ppo").advantages({k: v for k, v in batch.items() if k != "old_values"},
                                        cfg)
