"""Countdown's exact target p ∝ π_ref·exp(β r) against a brute-force sum over every sequence."""

import math

import numpy as np
import pytest

from flowrl_jax.eval.metrics import pass_at_k
from flowrl_jax.experiments.countdown.evaluate import heldout_metrics
from flowrl_jax.experiments.countdown.target import kl_divergence, target_distribution
from flowrl_jax.experiments.countdown.task import (EOS, MAX_ANSWER_TOKENS, NUMBER_BASE, OPS,
                                                   Problem, encode_answer, reward,
                                                   valid_answers)


def toy_reference(problem, seed=0):
    """An autoregressive π_ref over the problem's number tokens, the operators and EOS:
    next-token probabilities drawn at random per prefix; sequences stop at EOS or at
    MAX_ANSWER_TOKENS tokens. Returns {sequence: probability} over every sequence."""
    alphabet = [NUMBER_BASE + n for n in problem.numbers] + list(OPS) + [EOS]

    def next_probs(prefix):
        rng = np.random.default_rng([seed, *prefix])
        return rng.dirichlet(np.full(len(alphabet), 0.7))

    probs = {}

    def walk(prefix, p):
        if (prefix and prefix[-1] == EOS) or len(prefix) == MAX_ANSWER_TOKENS:
            probs[tuple(prefix)] = p
            return
        for tok, q in zip(alphabet, next_probs(tuple(prefix))):
            walk(prefix + [tok], p * q)

    walk([], 1.0)
    return probs


@pytest.mark.parametrize("beta", [0.5, 5.0, 15.0])
def test_target_matches_brute_force(beta):
    problem = Problem((2, 3, 4), 10)
    probs = toy_reference(problem)
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
    weights = {s: p * math.exp(beta * reward(problem, list(s))) for s, p in probs.items()}
    z = sum(weights.values())
    brute = {s: w / z for s, w in weights.items()}
    answers = [tuple(encode_answer(e)) for e in valid_answers(problem)]
    ref_logp = np.log([probs[a] for a in answers])
    tgt, other = target_distribution(ref_logp, beta)
    np.testing.assert_allclose(tgt, [brute[a] for a in answers], rtol=1e-9)
    assert math.isclose(other, sum(v for s, v in brute.items() if s not in answers),
                        rel_tol=1e-9)
    assert math.isclose(tgt.sum() + other, 1.0, rel_tol=1e-12)


def test_target_large_beta_and_bad_input():
    tgt, other = target_distribution(np.log([0.1, 0.3]), 1000.0)  # no overflow
    np.testing.assert_allclose(tgt, [0.25, 0.75], rtol=1e-12)
    assert other == 0.0
    with pytest.raises(ValueError, match="> 1"):
        target_distribution(np.log([0.8, 0.7]), 1.0)
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert math.isclose(kl_divergence([1.0, 0.0], [0.5, 0.5]), math.log(2))


def test_heldout_metrics_by_hand():
    p = Problem((2, 3, 4), 10)
    a, b = encode_answer("2*3+4"), encode_answer("3*4-2")
    wrong = encode_answer("2+3")
    samples = [[a, a, b, wrong]]
    answers = valid_answers(p)
    logp = np.log(np.full(len(answers), 0.1))  # π puts 0.1 on each valid answer
    ref = np.log(np.full(len(answers), 0.05))
    m = heldout_metrics([p], samples, [logp], [ref], beta=15.0, avg_n=16)
    assert m["accuracy_avg16"] == 0.75
    assert m["distinct_correct_per_problem"] == 2
    assert m["pass_at_k"]["2"] == pytest.approx(pass_at_k(4, 3, 2)) == 1.0
    assert m["pass_at_k"]["1"] == 0.75
    assert m["mass_on_valid"] == pytest.approx(0.6)
    assert m["mass_by_length"] == pytest.approx([0.0, 0.6])  # every answer uses 3 numbers
    tgt, other = target_distribution(ref, 15.0)
    want = kl_divergence(np.append(tgt, other), np.append(np.full(6, 0.1), 0.4))
    assert m["kl_target_policy"] == pytest.approx(want)
    assert m["answers_covered"] == 1.0  # π = 0.1 ≥ half the target's ≈ 1/6 on every answer
    half = np.log([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])  # 0.05 < 1/12: three answers uncovered
    assert heldout_metrics([p], samples, [half], [ref], 15.0)["answers_covered"] == 0.5
