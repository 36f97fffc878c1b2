"""What the trainer trains on: a `Task` supplies prompt batches and scores responses.

The default `DataTask` is the Grain prompt pipeline (`data/`) plus the reward registry
(`rewards/`, scored concurrently by a `RewardPool`). A custom task (the CPU demo, tests)
implements the same small protocol on token ids, without tokenizer or data files:

    class MyTask:
        def prompt_source(self, cfg, process_index, process_count) -> PromptSource: ...
        def score(self, batch: PromptBatch, prompt_index, responses) -> np.ndarray: ...
        # optional: validation_batches(cfg) -> list[PromptBatch]; close()

A `PromptSource` is an iterator of `PromptBatch` (this process's unique prompts of one
rollout step; the trainer samples G responses per prompt) with JSON-able
`get_state()` / `set_state(state)` so that resuming restores the position exactly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from flowrl_jax.config import Config, ConfigError
from flowrl_jax.data.pipeline import PromptEncoder, build_train_pipeline, load_train_records
from flowrl_jax.data.registry import REGISTRY, load_eval_set
from flowrl_jax.data.tokenizer import load_tokenizer
from flowrl_jax.rewards import RewardPool, SandboxConfig, available_rewards, isolation_mode, runs_code


@dataclass
class PromptBatch:
    """Unique prompts of one rollout step: token ids plus what scoring needs per prompt."""

    prompts: list[list[int]]
    ground_truth: list[Any]
    data_source: list[str]
    extra: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for name in ("ground_truth", "data_source"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"PromptBatch.{name} has {len(getattr(self, name))} entries, "
                                 f"expected {n} (one per prompt)")
        if not self.extra:
            self.extra = [{} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.prompts)

    def concat(self, other: "PromptBatch") -> "PromptBatch":
        """This batch followed by `other` (used to form the global batch across hosts)."""
        return PromptBatch(self.prompts + other.prompts, self.ground_truth + other.ground_truth,
                           self.data_source + other.data_source, self.extra + other.extra)


@runtime_checkable
class PromptSource(Protocol):
    """An iterator of PromptBatch with a restorable position."""

    def __next__(self) -> PromptBatch: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@runtime_checkable
class Task(Protocol):
    """Prompts and rewards for the RL loop."""

    def prompt_source(self, cfg: Config, process_index: int, process_count: int
                      ) -> PromptSource: ...

    def score(self, batch: PromptBatch, prompt_index: np.ndarray,
              responses: Sequence[Sequence[int]]) -> np.ndarray: ...


# --------------------------------------------------------------------------- default task


class _PipelineSource:
    """Adapts the Grain prompt pipeline (rows repeated G times) to unique-prompt batches."""

    def __init__(self, iterator: Any, group_size: int):
        self.it = iterator
        self.g = group_size

    def __iter__(self) -> "_PipelineSource":
        return self

    def __next__(self) -> PromptBatch:
        b = next(self.it)
        rows = range(0, len(b["data_source"]), self.g)
        ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"]).astype(bool)
        return PromptBatch(prompts=[ids[r][mask[r]].tolist() for r in rows],
                           ground_truth=[b["ground_truth"][r] for r in rows],
                           data_source=[b["data_source"][r] for r in rows],
                           extra=[{"id": b["id"][r], **(b["extra"][r] or {})} for r in rows])

    def get_state(self) -> Any:
        return self.it.get_state()

    def set_state(self, state: Any) -> None:
        self.it.set_state(state)

    def close(self) -> None:
        self.it.close()


def _check_source(source: str, key: str, known: dict[str, str]) -> None:
    """ConfigError naming `key` when no reward is registered for data source `source`."""
    if source not in known:
        raise ConfigError(f"{key}: no reward registered for data_source {source!r} (known: "
                          f"{', '.join(sorted(known))}; register one with "
                          "flowrl_jax.rewards.register_reward)")


class DataTask:
    """Training prompts from `cfg.data` (tokenised, chat-templated), rewards by data source."""

    def __init__(self, cfg: Config, tokenizer: Any = None, num_reward_workers: Optional[int] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or load_tokenizer(cfg.model.tokenizer or
                                                     _tokenizer_dir(cfg.model.path))
        self._pool = None
        self._num_workers = num_reward_workers
        self.sandbox = SandboxConfig(policy=cfg.rewards.sandbox.isolation)
        self.sandbox_backend: Optional[str] = None  # set by check() when rewards run code

    @property
    def pool(self) -> Any:
        if self._pool is None:
            self._pool = RewardPool(self._num_workers, sandbox=self.sandbox)
        return self._pool

    def run_info(self) -> dict[str, Any]:
        """What the run's `run_info.json` records about this task (the sandbox backend)."""
        return {"sandbox_backend": self.sandbox_backend,
                "sandbox_isolation": self.cfg.rewards.sandbox.isolation}

    def check(self) -> None:
        """Fail early (before compute): the training records load, every reward data_source
        they name is registered, and every validation set exists."""
        data = self.cfg.data
        known = available_rewards()
        for spec in data.custom:
            _check_source(spec.data_source, f"data.custom ({spec.name}).data_source", known)
        records, _ = load_train_records(data)
        sources = {r.data_source for r in records}
        for source in sorted(sources):
            _check_source(source, "data.train", known)
        if self.cfg.trainer.validate_every:
            customs = {s.name: s for s in data.custom}
            for name in self.cfg.eval.sets:
                if name not in REGISTRY and name not in customs:
                    raise ConfigError(f"eval.sets: unknown data set {name!r} (registry: "
                                      f"{', '.join(REGISTRY)}; data.custom: "
                                      f"{', '.join(sorted(customs)) or 'none'})")
                sources.add((REGISTRY.get(name) or customs[name]).data_source)
        if any(runs_code(s) for s in sources):
            # the backend is chosen (and logged) now; SandboxError here, before any compute,
            # when rewards.sandbox.isolation is required and nothing isolates
            self.sandbox_backend = isolation_mode(self.sandbox)[0]

    def prompt_source(self, cfg: Config, process_index: int, process_count: int) -> PromptSource:
        it = build_train_pipeline(cfg, self.tokenizer, 1, cfg.rollout.prompts_per_step,
                                  process_index=process_index, process_count=process_count)
        return _PipelineSource(it, 1)

    def decode(self, ids: Sequence[int]) -> str:
        """Response text (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def score(self, batch: PromptBatch, prompt_index: np.ndarray,
              responses: Sequence[Sequence[int]]) -> np.ndarray:
        items = [(batch.data_source[p], self.decode(r), batch.ground_truth[p])
                 for p, r in zip(prompt_index, responses)]
        return np.asarray(self.pool.score_batch(items), np.float32)

    def validation_batches(self, cfg: Config) -> list[PromptBatch]:
        """One batch per `eval.sets` entry, templated like the training prompts."""
        out = []
        for name in cfg.eval.sets:
            recs = load_eval_set(name, cfg.data.data_dir, cfg.eval.limit, cfg.data.custom)
            enc = PromptEncoder(self.tokenizer, cfg.data.template, cfg.data.chat_template,
                                cfg.data.max_prompt_length)
            ids = [enc.ids(enc.text(r))[-cfg.data.max_prompt_length:] for r in recs]
            out.append(PromptBatch(ids, [r.ground_truth for r in recs],
                                   [r.data_source for r in recs], [{"set": name} for _ in recs]))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def task_from_config(cfg: Config) -> Optional[Task]:
    """The task named by `task.factory: "package.module:callable"` (called with cfg), or None.

    This lets `flowrl-jax train` run a custom task (demo, tests) from a YAML file alone.
    """
    spec = (cfg.task or {}).get("factory")
    if not spec:
        return None
    mod_name, _, attr = str(spec).partition(":")
    try:
        # importlib: the module is the user's, named in the config
        factory = getattr(importlib.import_module(mod_name), attr or "Task")
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task.factory: cannot import {spec!r}: {e}") from e
    return factory(cfg)


def _tokenizer_dir(model_path: Optional[str]) -> Optional[str]:
    """The model directory when it holds a tokenizer, else None (the packaged one)."""
    if not model_path:
        return None
    p = Path(model_path)
    return str(p) if (p / "tokenizer_config.json").exists() or (p / "tokenizer.json").exists() \
        else None


def iterate(source: PromptSource) -> Iterator[PromptBatch]:
    """A plain Python iterator over a PromptSource."""
    while True:
        try:
            yield next(source)
        except StopIteration:
            return
