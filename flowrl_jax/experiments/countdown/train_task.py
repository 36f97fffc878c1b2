"""The Countdown task behind the trainer's Task protocol (token ids in, rewards out)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flowrl_jax.errors import ConfigError
from flowrl_jax.experiments.countdown.task import Problem, reward, split_problems
from flowrl_jax.rl.task import PromptBatch


class CountdownPromptSource:
    """Rollout step i presents `prompts_per_step` training problems drawn from (seed, i);
    the position is the step count, so a resumed run sees the same problems."""

    def __init__(self, problems: list[Problem], per_step: int, seed: int):
        self.problems, self.per_step, self.seed, self.i = problems, per_step, seed, 0

    def __iter__(self) -> "CountdownPromptSource":
        return self

    def __next__(self) -> PromptBatch:
        rng = np.random.default_rng([self.seed, self.i, 7])
        self.i += 1
        pick = [self.problems[j] for j in rng.choice(len(self.problems), self.per_step,
                                                      replace=False)]
        return PromptBatch([p.prompt_ids() for p in pick], pick, ["countdown"] * len(pick))

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


class CountdownTrainTask:
    """Training prompts from the training split; reward 1 for a valid answer, else 0."""

    def __init__(self, cfg: Any):
        num_train = cfg.task.get("num_train")
        try:
            self.train, self.heldout = split_problems(
                int(cfg.task.get("num_heldout", 32)),
                None if num_train is None else int(num_train))
        except ValueError as e:  # sizes out of range, or not integers
            raise ConfigError(f"task.num_heldout / task.num_train: {e}") from e

    def prompt_source(self, cfg: Any, process_index: int, process_count: int
                      ) -> CountdownPromptSource:
        return CountdownPromptSource(self.train, cfg.rollout.prompts_per_step,
                                     cfg.seed * process_count + process_index)

    def score(self, batch: PromptBatch, prompt_index: np.ndarray,
              responses: Sequence[Sequence[int]]) -> np.ndarray:
        return np.asarray([reward(batch.ground_truth[int(p)], r)
                           for p, r in zip(prompt_index, responses)], np.float32)


def make_task(cfg: Any) -> CountdownTrainTask:
    """`task.factory` entry point: `flowrl-jax train --config countdown` uses it."""
    return CountdownTrainTask(cfg)
