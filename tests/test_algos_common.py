"""algos/common.py against float64 NumPy written here: log-probs (plain and chunked), masked
reductions, group normalisation (SPEC §3), whitening, KL estimators, last-token rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl_jax.algos import common as C


@pytest.fixture(autouse=True)
def x64():
    # scoped, so float64 never leaks into other test modules of the same process
    with jax.enable_x64(True):
        yield


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- group norm


def np_group_norm(r, gid, valid=None):
    r = np.asarray(r, np.float64)
    valid = np.ones(len(r), bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros_like(r)
    for g in set(gid.tolist()):
        idx = [i for i in range(len(r)) if gid[i] == g and valid[i]]
        x = r[idx]
        if len(x) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = x.mean(), x.std(ddof=1)
        out[idx] = 0.0 if len(x) > 1 and np.all(x == x[0]) else (x - mean) / (std + 1e-6)
    return out


def test_group_norm_one_correct_of_eight():
    r = np.array([1.0] + [-1.0] * 7)
    got = np.asarray(C.group_normalize(jnp.asarray(r), group_size=8))
    # mean −0.75; deviations 1.75 / −0.25; unbiased var = (1.75² + 7·0.25²)/7 = 0.5
    std = np.sqrt(0.5)
    np.testing.assert_allclose(got[0], 1.75 / (std + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(got[1:], -0.25 / (std + 1e-6), rtol=1e-12)
    assert round(float(got[0]), 2) == 2.47 and round(float(got[1]), 2) == -0.35


def test_group_norm_all_equal_singleton_and_padding():
    r = jnp.asarray([0.3, 0.3, 0.3, 0.3, 5.0, 1.0, -1.0, 7.0])
    gid = jnp.asarray([0, 0, 0, 0, 1, 2, 2, 2])
    valid = jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0], bool)  # last row is padding
    got = np.asarray(C.group_normalize(r, gid, valid=valid))
    assert np.all(got[:4] == 0.0)  # all-equal group → exactly 0
    np.testing.assert_allclose(got[4], 5.0 / (1.0 + 1e-6), rtol=1e-12)  # singleton: mean 0 std 1
    s = np.std([1.0, -1.0], ddof=1)
    np.testing.assert_allclose(got[5:7], np.array([1.0, -1.0]) / (s + 1e-6), rtol=1e-12)
    assert got[7] == 0.0  # padding row excluded from its group's stats and zeroed


def test_group_norm_random_vs_numpy_and_jit():
    rng = np.random.default_rng(0)
    r = rng.normal(size=40)
    gid = rng.integers(0, 9, size=40)
    valid = rng.random(40) > 0.2
    got = jax.jit(C.group_normalize)(jnp.asarray(r), jnp.asarray(gid), valid=jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), np_group_norm(r, gid, valid), rtol=1e-10,
                               atol=1e-12)
    fixed = C.group_normalize(jnp.asarray(r), group_size=8)
    np.testing.assert_allclose(np.asarray(fixed), np_group_norm(r, np.arange(40) // 8),
                               rtol=1e-10)


def test_group_norm_all_equal_with_rounding_noise_is_exactly_zero():
    for dt in (jnp.float32, jnp.float64):
        got = np.asarray(C.group_normalize(jnp.full((7,), 0.1, dt), group_size=7))
        assert np.all(got == 0.0), (dt, got)


def test_group_ids_sparse_keys_and_range_check():
    keys = np.array([1005, 1005, 7, 7, 7, 42])
    dense = C.dense_group_ids(keys)
    assert dense.tolist() == [2, 2, 0, 0, 0, 1]
    r = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 3.0])
    np.testing.assert_allclose(np.asarray(C.group_normalize(r, jnp.asarray(dense))),
                               np_group_norm(np.asarray(r), dense), rtol=1e-10)
    with pytest.raises(ValueError, match="dense_group_ids"):
        C.group_normalize(r, jnp.asarray(keys))


def test_group_norm_bad_input():
    with pytest.raises(ValueError, match="group size"):
        C.group_normalize(jnp.zeros(10), group_size=4)
    with pytest.raises(ValueError, match="group_ids"):
        C.group_normalize(jnp.zeros(10), jnp.zeros(9, jnp.int32))


# --------------------------------------------------------------------------- masked ops


def test_masked_reductions_and_whiten():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6))
    m = (rng.random((4, 6)) > 0.4).astype(np.float64)
    m[2] = 0
    xj = jnp.asarray(np.where(m > 0, x, np.nan))  # masked entries are NaN: must not leak
    np.testing.assert_allclose(float(C.masked_sum(xj, m)), (x * m).sum(), rtol=1e-12)
    np.testing.assert_allclose(float(C.masked_mean(xj, m)), (x * m).sum() / m.sum(), rtol=1e-12)
    rows = np.asarray(C.masked_mean(xj, m, axis=-1))
    assert rows[2] == 0.0 and np.all(np.isfinite(rows))
    keep = [0, 1, 3]
    np.testing.assert_allclose(rows[keep], (x * m).sum(1)[keep] / m.sum(1)[keep], rtol=1e-12)
    v = x[m > 0]
    ref = (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8) * m
    np.testing.assert_allclose(np.asarray(C.masked_whiten(xj, m)), ref, rtol=1e-10, atol=1e-14)


def test_aggregate_modes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5))
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float64)
    assert np.isclose(float(C.aggregate(jnp.asarray(x), m, "token-mean")), (x * m).sum() / 8)
    per = (x * m).sum(1)[:2] / np.array([3, 5])
    assert np.isclose(float(C.aggregate(jnp.asarray(x), m, "seq-mean-token-mean")), per.mean())
    assert np.isclose(float(C.aggregate(jnp.asarray(x), m, "seq-mean-token-sum")),
                      (x * m).sum(1)[:2].mean())
    with pytest.raises(ValueError, match="loss_agg_mode"):
        C.aggregate(jnp.asarray(x), m, "bogus")


def test_last_token_rewards_and_kl_estimators():
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float64)
    r = np.array([2.0, -1.0, 5.0, 0.5])
    got = np.asarray(C.last_token_rewards(jnp.asarray(r), m))
    ref = np.zeros((4, 4))
    ref[0, 2], ref[1, 0], ref[3, 3] = 2.0, -1.0, 0.5
    np.testing.assert_array_equal(got, ref)

    lp, lq = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
    lr = lq - lp
    np.testing.assert_allclose(np.asarray(C.approx_kl(jnp.asarray(lp), jnp.asarray(lq), "k1")), -lr)
    np.testing.assert_allclose(np.asarray(C.approx_kl(jnp.asarray(lp), jnp.asarray(lq), "k2")),
                               0.5 * lr ** 2)
    np.testing.assert_allclose(np.asarray(C.approx_kl(jnp.asarray(lp), jnp.asarray(lq), "k3")),
                               np.exp(lr) - lr - 1)
    assert np.isfinite(float(C.kl_loss_term(jnp.asarray(0.0), jnp.asarray(1000.0))))
    with pytest.raises(ValueError, match="k4"):
        C.approx_kl(jnp.asarray(lp), jnp.asarray(lq), "k4")


# --------------------------------------------------------------------------- log-probs


def test_logprobs_from_logits_vs_numpy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 5, 11)) * 3
    tg = rng.integers(0, 11, size=(2, 5))
    for temp in (1.0, 0.6):
        lp, ent = C.token_logprobs_from_logits(jnp.asarray(z), jnp.asarray(tg), temp, True)
        ls = np_log_softmax(z / temp)
        np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(ls, tg[..., None], -1)[..., 0],
                                   rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(np.asarray(ent), -(np.exp(ls) * ls).sum(-1), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(C.entropy_from_logits(jnp.asarray(z / temp))),
                                   -(np.exp(ls) * ls).sum(-1), rtol=1e-10)
    # bf16 logits are computed in float32
    lp16 = C.token_logprobs_from_logits(jnp.asarray(z, jnp.bfloat16), jnp.asarray(tg))
    assert lp16.dtype == jnp.float32


@pytest.fixture(scope="module")
def lm_problem():
    rng = np.random.default_rng(4)
    b, t, h, v = 2, 10, 16, 50
    return dict(hidden=rng.normal(size=(b, t, h)), w=rng.normal(size=(h, v)) * 0.5,
                targets=rng.integers(0, v, size=(b, t)), ct=rng.normal(size=(b, t)),
                ct_e=rng.normal(size=(b, t)))


def _objective(fn):
    def f(hidden, w, targets, ct, ct_e):
        lp, ent = fn(hidden, w, targets)
        return jnp.sum(lp * ct) + jnp.sum(ent * ct_e)
    return f


@pytest.mark.parametrize("chunk,vchunk", [(4, None), (5, None), (16, None), (3, 7), (5, 25),
                                          (10, 64)])
def test_chunked_logprobs_match_full(lm_problem, chunk, vchunk):
    p = {k: jnp.asarray(v) for k, v in lm_problem.items()}
    temp = 0.7

    def full(h, w, tg):
        return C.token_logprobs_from_logits(jnp.einsum("bth,hv->btv", h, w), tg, temp, True)

    def chunked(h, w, tg):
        return C.token_logprobs_from_hidden(h, w, tg, temp, chunk_size=chunk,
                                            vocab_chunk_size=vchunk, return_entropy=True)

    lp_f, ent_f = full(p["hidden"], p["w"], p["targets"])
    lp_c, ent_c = jax.jit(chunked)(p["hidden"], p["w"], p["targets"])
    np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_f), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent_f), rtol=1e-10, atol=1e-12)
    # and the plain path against NumPy float64
    ls = np_log_softmax(np.einsum("bth,hv->btv", lm_problem["hidden"], lm_problem["w"]) / temp)
    np.testing.assert_allclose(np.asarray(lp_c), np.take_along_axis(
        ls, lm_problem["targets"][..., None], -1)[..., 0], rtol=1e-10)

    args = (p["hidden"], p["w"], p["targets"], p["ct"], p["ct_e"])
    g_f = jax.grad(_objective(full), argnums=(0, 1))(*args)
    g_c = jax.jit(jax.grad(_objective(chunked), argnums=(0, 1)))(*args)
    for a, b_ in zip(g_c, g_f):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-9, atol=1e-11)


def _max_intermediate_size(jaxpr) -> int:
    """Largest number of elements of any value produced anywhere in a (nested) jaxpr."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            best = max(best, int(np.prod(shape)) if shape else 1)
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else []:
            best = max(best, _max_intermediate_size(sub))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                best = max(best, _max_intermediate_size(inner))
            elif hasattr(param, "eqns"):
                best = max(best, _max_intermediate_size(param))
    return best


def test_chunked_logprobs_never_materialise_full_logits():
    b, t, h, v = 2, 64, 8, 96
    hid = jnp.ones((b, t, h), jnp.float32)
    w = jnp.ones((h, v), jnp.float32)
    tg = jnp.zeros((b, t), jnp.int32)

    def loss(hid, w, chunk, vchunk):
        return jnp.sum(C.token_logprobs_from_hidden(hid, w, tg, 1.0, chunk, vchunk))

    full = jax.make_jaxpr(jax.grad(lambda a, c: jnp.sum(C.token_logprobs_from_logits(
        jnp.einsum("bth,hv->btv", a, c), tg)), argnums=(0, 1)))(hid, w)
    assert _max_intermediate_size(full.jaxpr) >= b * t * v  # the check can see full logits
    jp = jax.make_jaxpr(jax.grad(lambda a, c: loss(a, c, 16, None), argnums=(0, 1)))(hid, w)
    assert _max_intermediate_size(jp.jaxpr) <= b * 16 * v
    jp = jax.make_jaxpr(jax.grad(lambda a, c: loss(a, c, 16, 32), argnums=(0, 1)))(hid, w)
    assert _max_intermediate_size(jp.jaxpr) <= max(b * 16 * 32, h * v)


def test_logprobs_from_hidden_bad_shapes():
    with pytest.raises(ValueError, match="lm_head_w"):
        C.token_logprobs_from_hidden(jnp.zeros((1, 4, 8)), jnp.zeros((7, 20)),
                                     jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="targets"):
        C.token_logprobs_from_hidden(jnp.zeros((1, 4, 8)), jnp.zeros((8, 20)),
                                     jnp.zeros((1, 5), jnp.int32))
