"""The demo task: prompts with several valid answers of different rewards (paper Figure 1).

Vocabulary of a tiny Qwen2: token 1 is BOS, tokens `PROMPT_BASE + k` name prompt k, and the
answer is the single token the policy generates. Prompt k has `len(MODE_REWARDS)` valid answers
(modes) with rewards 1.0, 0.8, 0.6; every other token scores 0. A reward maximiser collapses
onto the best mode; FlowRL should match p(y|x) ∝ π_ref(y|x)·exp(β r(x, y)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOS = 1
PROMPT_BASE = 3
ANSWER_BASE = 10
MODE_REWARDS = (1.0, 0.8, 0.6)
MODE_STRIDE = 4  # answers of prompt k: ANSWER_BASE + k + MODE_STRIDE·m


@dataclass(frozen=True)
class DemoTask:
    """Reward table and target distribution of the multimodal demo task."""

    num_prompts: int = 4
    vocab_size: int = 32

    def __post_init__(self) -> None:
        last = ANSWER_BASE + self.num_prompts - 1 + MODE_STRIDE * (len(MODE_REWARDS) - 1)
        if last >= self.vocab_size or PROMPT_BASE + self.num_prompts > ANSWER_BASE:
            raise ValueError(f"demo task: {self.num_prompts} prompts do not fit a vocabulary of "
                             f"{self.vocab_size} tokens")

    def prompt_ids(self, k: int) -> list[int]:
        """Token ids of prompt k."""
        return [BOS, PROMPT_BASE + k]

    def mode_tokens(self, k: int) -> list[int]:
        """The valid answers of prompt k, best first."""
        return [ANSWER_BASE + k + MODE_STRIDE * m for m in range(len(MODE_REWARDS))]

    def reward_table(self) -> np.ndarray:
        """r[k, token] for every prompt and vocabulary token."""
        table = np.zeros((self.num_prompts, self.vocab_size), np.float64)
        for k in range(self.num_prompts):
            for tok, r in zip(self.mode_tokens(k), MODE_REWARDS):
                table[k, tok] = r
        return table

    def reward(self, k: int, response: list[int] | np.ndarray) -> float:
        """Reward of a response to prompt k: the table entry of its first token (0 if empty)."""
        if len(response) == 0:
            return 0.0
        modes = self.mode_tokens(k)  # scored per response: no table to rebuild each call
        tok = int(response[0])
        return float(MODE_REWARDS[modes.index(tok)]) if tok in modes else 0.0

    def target(self, ref_logp: np.ndarray, beta: float) -> np.ndarray:
        """p ∝ π_ref·exp(β r) per prompt, from reference log-probs [K, V] (float64)."""
        logits = np.asarray(ref_logp, np.float64) + beta * self.reward_table()
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of KL(p‖q) for row-stochastic [K, V] arrays (float64, 0·log 0 = 0)."""
    p = np.asarray(p, np.float64)
    q = np.clip(np.asarray(q, np.float64), 1e-300, None)
    terms = np.where(p > 0, p * (np.log(np.clip(p, 1e-300, None)) - np.log(q)), 0.0)
    return float(terms.sum(axis=1).mean())


def mode_masses(task: DemoTask, dist: np.ndarray) -> list[float]:
    """Probability mass on each mode (best first), averaged over prompts."""
    return [float(np.mean([dist[k, task.mode_tokens(k)[m]] for k in range(task.num_prompts)]))
            for m in range(len(MODE_REWARDS))]


def summarize(task: DemoTask, policy: np.ndarray, target: np.ndarray) -> dict:
    """The summary.json entry of one algorithm: KLs both ways, mass per mode, modes covered."""
    mass = mode_masses(task, policy)
    tmass = mode_masses(task, target)
    return {
        "kl_target_policy": kl(target, policy),
        "kl_policy_target": kl(policy, target),
        "mass_per_mode": mass,
        "target_mass_per_mode": tmass,
        "modes_covered": int(sum(m >= 0.5 * t for m, t in zip(mass, tmass))),
        "mass_on_valid_answers": float(sum(mass)),
    }


# --------------------------------------------------------------------------- trainer adapter


class DemoPromptSource:
    """Every rollout step presents all prompts once; the position is the step count."""

    def __init__(self, task: DemoTask):
        self.task, self.i = task, 0

    def __iter__(self) -> "DemoPromptSource":
        return self

    def __next__(self):
        from flowrl_jax.rl.task import PromptBatch

        self.i += 1
        k = range(self.task.num_prompts)
        return PromptBatch([self.task.prompt_ids(j) for j in k], list(k),
                           ["demo"] * self.task.num_prompts)

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


class DemoTrainTask:
    """The demo task behind the trainer's Task protocol (token ids in, rewards out)."""

    def __init__(self, cfg):
        arch = cfg.model.arch
        vocab = arch.vocab_size if arch is not None else int(cfg.task.get("vocab_size", 32))
        self.task = DemoTask(num_prompts=int(cfg.task.get("num_prompts", 4)), vocab_size=vocab)

    def prompt_source(self, cfg, process_index: int, process_count: int) -> DemoPromptSource:
        return DemoPromptSource(self.task)

    def score(self, batch, prompt_index, responses) -> np.ndarray:
        return np.asarray([self.task.reward(int(batch.ground_truth[int(p)]), r)
                           for p, r in zip(prompt_index, responses)], np.float32)


def make_task(cfg) -> DemoTrainTask:
    """`task.factory` entry point: `flowrl-jax train --config configs/demo.yaml` uses it."""
    return DemoTrainTask(cfg)
