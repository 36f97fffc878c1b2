"""π_ref: a tiny random Qwen2 fitted by a few supervised steps to a broad, imperfect answer
distribution on the training problems.

The supervised answers mix valid ones (2-number answers weighted `short_weight`× a
3-number one, so π_ref is not uniform over the valid answers) with uniformly drawn
well-formed expressions over the problem's numbers (mostly wrong): π_ref starts with some
accuracy, many answers, and room to improve.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flowrl_jax.experiments.countdown.task import (MAX_ANSWER_TOKENS, PAD, Problem,
                                                   all_expressions, encode_answer,
                                                   valid_answers)


@dataclass(frozen=True)
class SFTSettings:
    """How π_ref is fitted."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    valid_fraction: float = 0.75  # share of supervised answers that are valid
    short_weight: float = 3.0  # a 2-number valid answer is drawn this many times as often
    seed: int = 0


def sft_batch(problems: list[Problem], rng: np.random.Generator, s: SFTSettings
              ) -> tuple[np.ndarray, np.ndarray]:
    """(input ids [B, P + A], loss mask [B, P + A]) of prompt ++ answer ++ padding; the mask
    marks the positions whose *next* token is an answer token."""
    rows, masks = [], []
    for i in rng.integers(0, len(problems), s.batch_size):
        p = problems[i]
        if rng.random() < s.valid_fraction:
            answers = valid_answers(p)
            w = np.asarray([s.short_weight if len(a) == 3 else 1.0 for a in answers])
            expr = answers[rng.choice(len(answers), p=w / w.sum())]
        else:
            shapes = all_expressions(p.numbers)
            expr = shapes[rng.integers(len(shapes))]
        prompt, answer = p.prompt_ids(), encode_answer(expr)
        pad = MAX_ANSWER_TOKENS - len(answer)
        rows.append(prompt + answer + [PAD] * pad)
        masks.append([0] * (len(prompt) - 1) + [1] * len(answer) + [0] * (pad + 1))
    return np.asarray(rows, np.int32), np.asarray(masks, np.float32)


def fit_reference(model: nnx.Module, problems: list[Problem], s: SFTSettings) -> list[float]:
    """Fit `model` in place by `s.steps` Adam steps of answer cross-entropy; the losses."""
    graphdef, params = nnx.split(model)
    opt = optax.adam(s.lr)
    opt_state = opt.init(params)

    def loss_fn(params, ids, mask):
        logits = nnx.merge(graphdef, params)(ids).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        m = mask[:, :-1]
        return -(tok * m).sum() / m.sum()

    @jax.jit
    def step(params, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(s.seed)
    losses = []
    for _ in range(s.steps):
        ids, mask = sft_batch(problems, rng, s)
        params, opt_state, loss = step(params, opt_state, ids, mask)
        losses.append(loss)
    nnx.update(model, params)
    return [float(x) for x in jax.device_get(losses)]
