"""The Grain pipeline of one rollout step's samples: score → regroup → advantages → mini-batches.

Completed samples leave the sampler as `Sample`s (each records the policy version that
generated it and its behaviour log-probs, for bounded staleness) and flow through Grain stages:

  1. `scored_samples`: rewards scored by the task, one sample per call, on Grain's read
     threads (the task's own workers do the heavy part: Math-Verify processes, the code
     sandbox), so scoring overlaps the device's log-prob pass;
  2. `GroupByPrompt`: samples regrouped into the G samples of each prompt as they complete
     (any order in, whole groups out; a prompt missing samples is an error naming it);
  3. the algorithm's batch preprocessing (r̂ / advantages) on the whole global batch, once
     the device's old/ref log-probs are in (the trainer calls `StepFns.advantages`, the one
     place that computes them);
  4. `MiniBatches`: the seeded shuffle of each epoch cut into fixed-size mini-batches whose
     response length is cut to a length bucket (rl/rollout_batch.py does the cutting).

Every random choice derives from (cfg.seed, step), so the pipeline of step s is a pure
function of the rollout; its iterator state (mini-batches consumed, i.e. the position in
the shuffle) goes into the run checkpoint's meta next to the prompt iterator's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from flowrl_jax.config import Config
from flowrl_jax.rl.rollout_batch import RolloutBatch, bucket
from flowrl_jax.rl.task import PromptBatch, Task
from flowrl_jax.sampling.results import Rollout


@dataclass(frozen=True)
class Sample:
    """One completed sample as it leaves the sampler."""

    row: int  # the row of the sampler's rollout it came from
    prompt_index: int
    sample_index: int
    tokens: tuple[int, ...]
    policy_version: int  # rollout steps of training behind the params that generated it
    reward: Optional[float] = None
    logprobs: tuple[float, ...] = ()  # the behaviour policy's log-probs of `tokens`


def samples_of(ro: Rollout, policy_version: int) -> list[Sample]:
    """The samples of a sampler rollout, in its row order."""
    return [Sample(i, int(p), int(s), tuple(t), policy_version, logprobs=tuple(lp))
            for i, (p, s, t, lp) in enumerate(zip(ro.prompt_index, ro.sample_index,
                                                   ro.token_lists(), ro.logprob_lists()))]


class ScoreSample(grain.transforms.Map):
    """Grain stage: the task's reward of one sample."""

    def __init__(self, task: Task, batch: PromptBatch):
        self.task = task
        self.batch = batch

    def map(self, sample: Sample) -> Sample:
        r = np.asarray(self.task.score(self.batch, np.asarray([sample.prompt_index], np.int32),
                                       [list(sample.tokens)]), np.float32)
        if r.shape != (1,):
            raise ValueError(f"task.score returned shape {r.shape} for one response, "
                             "expected (1,)")
        return replace(sample, reward=float(r[0]))


def scored_samples(samples: Sequence[Sample], task: Task, batch: PromptBatch,
                   threads: int) -> grain.IterDataset:
    """Grain dataset of `samples` with rewards, scored `threads` at a time (order kept)."""
    ds = grain.MapDataset.source(list(samples)).map(ScoreSample(task, batch))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=2 * threads))


class _GroupIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, group_size: int):
        super().__init__(parent)
        self.g = group_size
        self.pending: dict[int, list[Sample]] = {}
        self.emitted = 0

    def __next__(self) -> list[Sample]:
        while True:
            try:
                s = next(self._parent)
            except StopIteration:
                if self.pending:
                    p, got = min(self.pending.items())
                    raise ValueError(f"rollout: prompt {p} has {len(got)} of its "
                                     f"{self.g} samples") from None
                raise
            group = self.pending.setdefault(s.prompt_index, [])
            group.append(s)
            if len(group) == self.g:
                del self.pending[s.prompt_index]
                self.emitted += 1
                return sorted(group, key=lambda x: x.sample_index)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "groups_emitted": self.emitted}

    def set_state(self, state: dict) -> None:
        # Partial groups are not part of the state: a checkpoint is only taken between steps.
        self._parent.set_state(state["parent"])
        self.emitted = int(state["groups_emitted"])
        self.pending = {}


class GroupByPrompt(grain.IterDataset):
    """Grain stage: samples in any order → the G samples of each prompt, as each completes."""

    def __init__(self, parent: grain.IterDataset, group_size: int):
        super().__init__(parent)
        self.g = group_size

    def __iter__(self) -> _GroupIterator:
        return _GroupIterator(self._parent.__iter__(), self.g)


def rewards_by_row(groups: Sequence[Sequence[Sample]], rows: int) -> np.ndarray:
    """[rows] float32 rewards in the sampler's row order, from regrouped scored samples."""
    out = np.zeros((rows,), np.float32)
    seen = np.zeros((rows,), bool)
    for group in groups:
        for s in group:
            out[s.row], seen[s.row] = s.reward, True
    missing = np.flatnonzero(~seen)
    if missing.size:
        raise ValueError(f"rollout: rows {missing[:5].tolist()} were never scored")
    return out


class MiniBatches(grain.MapDataset):
    """Grain stage: `epochs` seeded shuffles of a batch cut into mini-batches of `size` rows."""

    def __init__(self, batch: RolloutBatch, size: int, rng: np.random.Generator, epochs: int,
                 buckets: Sequence[int], max_response: int):
        super().__init__()
        self.batch = batch
        self.size = size
        self.buckets = tuple(buckets)
        self.max_response = max_response
        n = batch.rows
        # One permutation per epoch, drawn in turn from the step's generator.
        self.cuts = [order[a:a + size] for order in (rng.permutation(n) for _ in range(epochs))
                     for a in range(0, n, size)]

    def __len__(self) -> int:
        return len(self.cuts)

    def __getitem__(self, index: int) -> RolloutBatch:
        mb = self.batch.take_rows(self.cuts[index], self.size)
        longest = int(mb.response_mask.sum(axis=1).max(initial=1))
        return mb.trim_response(bucket(max(longest, 1), self.buckets, self.max_response))


@dataclass
class ScoredRollout:
    """This host's rewards (sampler row order), its prompt groups and the scoring time."""

    rewards: np.ndarray
    groups: list[list[Sample]]
    seconds: float

    @property
    def policy_versions(self) -> np.ndarray:
        """[rows] the policy version of each sample (row order)."""
        out = np.zeros((len(self.rewards),), np.int64)
        for group in self.groups:
            for s in group:
                out[s.row] = s.policy_version
        return out


class RolloutPipeline:
    """The rollout pipeline of a run (see module docstring); one `score`/`minibatches` pair
    per rollout step, its position saved with the run checkpoint."""

    def __init__(self, cfg: Config, task: Task, reward_threads: Optional[int] = None):
        self.cfg = cfg
        self.task = task
        # as many samples in flight as today's RewardPool default (one per CPU)
        self.threads = max(1, int(reward_threads or os.cpu_count() or 1))
        self.steps = 0  # rollout steps whose mini-batches were all consumed
        self.position = 0  # mini-batches consumed in the current step

    def score(self, batch: PromptBatch, ro: Rollout, policy_version: int) -> ScoredRollout:
        """Stages 1-2 over this host's rollout: rewards and the prompt groups."""
        t0 = time.perf_counter()
        groups = list(GroupByPrompt(scored_samples(samples_of(ro, policy_version), self.task,
                                                   batch, self.threads),
                                    self.cfg.rollout.samples_per_prompt))
        rewards = rewards_by_row(groups, len(ro.lengths))
        return ScoredRollout(rewards, groups, time.perf_counter() - t0)

    def minibatches(self, data: RolloutBatch, step: int, max_response: int
                    ) -> Iterator[RolloutBatch]:
        """Stage 4 over the batch with advantages: the step's mini-batches in order."""
        cfg = self.cfg
        ds = MiniBatches(data, cfg.trainer.mini_batch_size,
                         np.random.default_rng([cfg.seed, step, 2]), cfg.trainer.epochs,
                         cfg.data.length_buckets, max_response)
        self.position = 0
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        for mb in it:
            self.position += 1
            yield mb
        self.steps = step + 1
        self.position = 0

    def get_state(self) -> dict:
        """JSON-able position: steps done and mini-batches consumed of the current one."""
        return {"steps": self.steps, "minibatches": self.position}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` output (checkpoints are taken between steps)."""
        self.steps = int(state.get("steps", 0))
        self.position = int(state.get("minibatches", 0))
        if self.position:
            raise ValueError(f"rollout pipeline state {state}: saved in the middle of a step")
