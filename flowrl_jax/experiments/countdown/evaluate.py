"""Held-out metrics of one policy: Avg@16, pass@k, distinct correct answers (from samples),
and the exact mass on each valid answer against the target (from teacher-forced scoring)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowrl_jax.eval.metrics import is_correct, pass_at_k
from flowrl_jax.experiments.countdown.target import kl_divergence, target_distribution
from flowrl_jax.experiments.countdown.task import (MAX_ANSWER_TOKENS, PAD, Problem,
                                                   decode_answer, encode_answer, reward,
                                                   valid_answers)
from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams

SCORE_ROWS = 512  # rows per scoring call: one compiled shape whatever the problem count


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(graphdef: Any, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(ids).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (tok * mask[:, :-1]).sum(axis=1)


def answer_logprobs(model: nnx.Module, problems: list[Problem]) -> list[np.ndarray]:
    """log π(answer ++ EOS | prompt) of every valid answer of every problem (temperature 1)."""
    rows, masks, owner = [], [], []
    for k, p in enumerate(problems):
        prompt = p.prompt_ids()
        for expr in valid_answers(p):
            ans = encode_answer(expr)
            pad = MAX_ANSWER_TOKENS - len(ans)
            rows.append(prompt + ans + [PAD] * pad)
            masks.append([0] * (len(prompt) - 1) + [1] * len(ans) + [0] * (pad + 1))
            owner.append(k)
    graphdef, params = nnx.split(model)
    out = []
    for a in range(0, len(rows), SCORE_ROWS):
        ids = np.zeros((SCORE_ROWS, len(rows[0])), np.int32)
        m = np.zeros(ids.shape, np.float32)
        chunk = rows[a:a + SCORE_ROWS]
        ids[:len(chunk)], m[:len(chunk)] = chunk, masks[a:a + SCORE_ROWS]
        out.append(np.asarray(_sequence_logprobs(graphdef, params, ids, m))[:len(chunk)])
    flat, owner = np.concatenate(out).astype(np.float64), np.asarray(owner)
    return [flat[owner == k] for k in range(len(problems))]


def sample_answers(engine: SamplingEngine, params: Any, problems: list[Problem], n: int,
                   seed: int) -> list[list[list[int]]]:
    """n sampled responses per problem (temperature 1, the training distribution)."""
    sp = SamplingParams(temperature=1.0, max_new_tokens=MAX_ANSWER_TOKENS + 2, n=n, seed=seed)
    ro = engine.generate(params, [p.prompt_ids() for p in problems], sp)
    toks = ro.token_lists()
    return [[toks[i] for i in np.flatnonzero(ro.prompt_index == k)] for k in range(len(problems))]


def heldout_metrics(problems: list[Problem], samples: list[list[list[int]]],
                    logp_valid: list[np.ndarray], ref_logp_valid: list[np.ndarray],
                    beta: float, avg_n: int = 16) -> dict:
    """The summary figures of one policy on the held-out problems (see report.py)."""
    n = min(len(s) for s in samples)
    scores = [[reward(p, r) for r in s] for p, s in zip(problems, samples)]
    pass_k = {str(k): float(np.mean([pass_at_k(len(sc), sum(map(is_correct, sc)), k)
                                     for sc in scores])) for k in range(1, n + 1)}
    distinct = [len({decode_answer(r) for r, sc in zip(s, scs) if is_correct(sc)})
                for s, scs in zip(samples, scores)]
    valid_mass, kls, covered, by_len, tgt_by_len, per_answer = [], [], [], [], [], []
    for p, lp, ref_lp in zip(problems, logp_valid, ref_logp_valid):
        pi = np.exp(lp)
        tgt, tgt_other = target_distribution(ref_lp, beta)
        other = max(1.0 - pi.sum(), 0.0)
        valid_mass.append(float(pi.sum()))
        kls.append(kl_divergence(np.append(tgt, tgt_other), np.append(pi, other)))
        covered.append(float(np.mean(pi >= 0.5 * tgt)))
        short = np.asarray([len(a) == 3 for a in valid_answers(p)])
        by_len.append([float(pi[short].sum()), float(pi[~short].sum())])
        tgt_by_len.append([float(tgt[short].sum()), float(tgt[~short].sum())])
        per_answer.append({"problem": p.key(), "answers": valid_answers(p),
                           "policy": pi.tolist(), "target": tgt.tolist()})
    return {
        "accuracy_avg16": float(np.mean([np.mean(list(map(is_correct, sc[:avg_n])))
                                          for sc in scores])),
        "pass_at_k": pass_k,
        "distinct_correct_per_problem": float(np.mean(distinct)),
        "valid_answers_per_problem": float(np.mean([len(lp) for lp in logp_valid])),
        "mass_on_valid": float(np.mean(valid_mass)),
        "kl_target_policy": float(np.mean(kls)),
        "answers_covered": float(np.mean(covered)),
        "mass_by_length": np.mean(by_len, axis=0).tolist(),  # [2-number, 3-number] answers
        "target_mass_by_length": np.mean(tgt_by_len, axis=0).tolist(),
        "per_answer": per_answer,
    }
