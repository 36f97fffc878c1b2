"""The heart of the paper as a unit test: FlowRL matches a multimodal reward distribution,
GRPO collapses onto the best mode.

Policy: a softmax over K = 6 answers per prompt (a logits table, initialised at π_ref),
2 prompts, a learnable scalar log Z per prompt. Every step samples 16 groups of G = 8
answers per prompt from the *current* policy with one shared sampler (same seeds for both
algorithms), computes old/ref log-probs, the algorithm's own advantages (SPEC §3 group
normalisation), and takes 2 Adam steps on the algorithm's loss (the 2nd is off-policy, so
the importance weights are exercised). The whole run is one jitted lax.scan.

What FlowRL's loss matches: δ = log Z + log π(y) − β r̂(y) − log π_ref(y) is driven to 0 for
every sampled y, so p(y) ∝ π_ref(y)·exp(β r̂(y)).
 * With a fixed log-reward (algo.reward_norm = "none": r̂ := raw reward) the target is
   exactly π_ref·exp(β r)/Z.
 * With group-normalised r̂ (what the trainer feeds it) r̂ depends on the other members of
   the group, i.e. on π itself. The stationary point of the expected gradient (softmax
   logits: π_k·E[δ | y = k] = 0 for all k) is the self-consistent target
   p* ∝ π_ref·exp(β ρ(p*)), ρ_k(p) = E[r̂ of a member with answer k | other G−1 ~ p].
   ρ is computed here exactly by enumerating the C(G−1+K−1, K−1) = 792 group compositions,
   and p* by damped fixed-point iteration, all in float64 NumPy independent of the code.
"""

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import AlgoConfig

K, G, GROUPS = 6, 8, 16
REF_LOGITS = np.array([[0.4, 0.0, -0.3, 0.2, 0.0, 0.3],
                       [0.0, 0.5, 0.0, -0.2, 0.3, 0.0]])
# three rewarded modes per prompt with different rewards, the rest 0
GRADED = np.array([[1.0, 0.0, 0.9, 0.0, 0.8, 0.0],
                   [0.0, 0.7, 1.0, 0.0, 0.0, 0.85]])
# math-style ±1: several equally correct answers
BINARY = np.array([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
                   [-1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
P = REF_LOGITS.shape[0]


@lru_cache(maxsize=None)
def _train_fn(name: str, beta: float, rewards_key: str, raw_reward: bool, steps: int):
    """A jitted full training run → final answer distribution [P, K]."""
    # reward_norm="none": FlowRL's r̂ is the raw reward (GRPO ignores the field)
    cfg = AlgoConfig(name=name, beta=beta, reward_norm="none" if raw_reward else "group")
    algo = get_algorithm(name)
    table = jnp.asarray({"graded": GRADED, "binary": BINARY}[rewards_key], jnp.float32)
    ref_lp = jax.nn.log_softmax(jnp.asarray(REF_LOGITS, jnp.float32), -1)
    opt = optax.adam(0.05)
    n = GROUPS * G
    pid = jnp.repeat(jnp.arange(P), n)  # prompt of each sequence
    gid = jnp.arange(P * n) // G  # G consecutive samples form a group

    def logp_of(theta, y):
        return jax.nn.log_softmax(theta, -1)[pid, y][:, None]  # [B, T=1]

    def sample(theta, key):  # the one sampler both algorithms use
        return jax.random.categorical(key, theta[:, None, :], axis=-1, shape=(P, n)).reshape(-1)

    def step(carry, key):
        params, ost = carry
        y = sample(params["theta"], key)
        batch = dict(response_mask=jnp.ones((P * n, 1)),
                     old_logp=jax.lax.stop_gradient(logp_of(params["theta"], y)),
                     ref_logp=ref_lp[pid, y][:, None], rewards=table[pid, y], group_ids=gid)
        batch.update(algo.advantages(batch, cfg))

        def loss_fn(p):
            return algo.loss(cfg, batch, dict(logp=logp_of(p["theta"], y), log_z=p["log_z"][pid]))

        for _ in range(2):
            grads, _ = jax.grad(loss_fn, has_aux=True)(params)
            upd, ost = opt.update(grads, ost, params)
            params = optax.apply_updates(params, upd)
        return (params, ost), None

    @jax.jit
    def train(seed):
        params = dict(theta=jnp.asarray(REF_LOGITS, jnp.float32), log_z=jnp.zeros((P,)))
        keys = jax.random.split(jax.random.PRNGKey(seed), steps)
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
        return jax.nn.softmax(params["theta"], -1)

    return train


def run(name, beta, rewards_key, raw_reward, steps, seed=0):
    return np.asarray(_train_fn(name, beta, rewards_key, raw_reward, steps)(seed), np.float64)


# --------------------------------------------------------------------------- exact targets


def _compositions(n, k):
    if k == 1:
        yield (n,)
        return
    for i in range(n + 1):
        for rest in _compositions(n - i, k - 1):
            yield (i,) + rest


COMPS = np.array(list(_compositions(G - 1, K)))  # answer counts of the other G − 1 members
LOG_MULT = math.lgamma(G) - np.array([[math.lgamma(c + 1) for c in row] for row in COMPS]).sum(1)


def rho(p, r):
    """ρ_k = E[r̂ of a member answering k], others ~ Multinomial(G − 1, p); SPEC §3 r̂."""
    w = np.exp(LOG_MULT + (COMPS * np.log(np.maximum(p, 1e-300))).sum(1))
    out = np.zeros(K)
    for k in range(K):
        c = COMPS.copy()
        c[:, k] += 1
        mean = (c * r).sum(1) / G
        var = np.maximum(((c * r * r).sum(1) - G * mean ** 2) / (G - 1), 0.0)
        rh = np.where(var < 1e-12, 0.0, (r[k] - mean) / (np.sqrt(var) + 1e-6))
        out[k] = (w * rh).sum()
    return out


def self_consistent_target(ref_logits, r, beta):
    """p* = softmax(log π_ref + β ρ(p*)) by damped fixed-point iteration."""
    lref = ref_logits - np.log(np.exp(ref_logits).sum())
    p = np.exp(lref)
    for _ in range(5000):
        t = lref + beta * rho(p, r)
        q = np.exp(t - t.max())
        p_new = 0.8 * p + 0.2 * q / q.sum()
        if np.abs(p_new - p).max() < 1e-13:
            break
        p = p_new
    t = lref + beta * rho(p, r)
    q = np.exp(t - t.max())
    assert np.abs(q / q.sum() - p).max() < 1e-9, "fixed point did not converge"
    return p


def kl(a, b):
    return float(np.sum(a * (np.log(a) - np.log(b))))


# --------------------------------------------------------------------------- tests


def test_flowrl_matches_exp_reward_target_grpo_collapses():
    beta = 4.0
    lref = REF_LOGITS - np.log(np.exp(REF_LOGITS).sum(1, keepdims=True))
    target = np.exp(lref + beta * GRADED)
    target /= target.sum(1, keepdims=True)
    flow = run("flowrl", beta, "graded", True, 300)
    grpo = run("grpo", beta, "graded", True, 300)
    for p in range(P):
        assert kl(target[p], flow[p]) < 0.05 and kl(flow[p], target[p]) < 0.05, (p, flow[p])
        best = GRADED[p].argmax()
        assert grpo[p, best] > 0.9, (p, grpo[p])
        assert kl(target[p], grpo[p]) > 0.5
        # the target really is multimodal and FlowRL keeps every mode
        modes = np.flatnonzero(GRADED[p] > 0)
        assert np.all(target[p, modes] > 0.15) and np.all(flow[p, modes] > 0.15)


def test_flowrl_with_group_normalised_rhat_matches_self_consistent_target():
    beta = 1.0
    flow = run("flowrl", beta, "graded", False, 400)
    grpo = run("grpo", beta, "graded", False, 400)
    for p in range(P):
        target = self_consistent_target(REF_LOGITS[p], GRADED[p], beta)
        assert kl(target, flow[p]) < 0.05 and kl(flow[p], target) < 0.05, (p, flow[p], target)
        best = GRADED[p].argmax()
        assert flow[p, best] < 0.7
        assert np.sum(flow[p] > 0.1) >= 3  # several modes alive
        assert grpo[p, best] > 0.9, (p, grpo[p])


def test_flowrl_keeps_ref_proportions_among_equally_correct_answers():
    """Binary ±1 reward, β = 15 (the paper's setting): every correct answer gets the same r̂,
    so FlowRL's target is π_ref restricted to the correct answers."""
    flow = run("flowrl", 15.0, "binary", False, 1000)
    for p in range(P):
        target = self_consistent_target(REF_LOGITS[p], BINARY[p], 15.0)
        correct = BINARY[p] > 0
        ref = np.exp(REF_LOGITS[p]) * correct
        np.testing.assert_allclose(target, ref / ref.sum(), atol=1e-4)  # what p* means here
        assert kl(target, flow[p]) < 0.05 and kl(flow[p], target) < 0.05, (p, flow[p], target)


@pytest.mark.parametrize("name", ["flowrl", "grpo"])
def test_runs_are_deterministic(name):
    a = run(name, 4.0, "graded", True, 300, seed=0)
    b = run(name, 4.0, "graded", True, 300, seed=0)
    np.testing.assert_array_equal(a, b)
