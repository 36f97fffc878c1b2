"""`data` and `rewards`: the training prompts (shipped and user data sets) and how responses
are scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from flowrl_jax.config.check import check


@dataclass(frozen=True)
class DatasetSpec:
    """A user data set: a file (or `datasets` save_to_disk folder) and a field mapping."""

    name: str = ""
    path: str = ""
    # jsonl | json | parquet | hf_dataset (a save_to_disk folder); None → from the path
    format: Optional[str] = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # gold answer (math) or tests (code); dotted paths allowed
    id_field: Optional[str] = None
    data_source: str = "math_dapo"  # reward registry key
    template: Literal["math", "code", "none"] = "math"
    # how the gold answer is read from `answer_field`: as is, the last \boxed{} of a
    # solution, or the text after "####" (GSM8K style)
    answer_extract: Literal["none", "last_boxed", "after_hashes"] = "none"
    starter_code_field: Optional[str] = None  # code sets: field with a starter-code stub


@dataclass(frozen=True)
class DataConfig:
    """Training prompts: named shipped data sets and/or user data sets."""

    train: tuple[str, ...] = ("dapo_math_17k",)
    custom: tuple[DatasetSpec, ...] = ()
    # root of the named data sets; None → $FLOWRL_DATA_DIR, else the copy inside the package
    data_dir: Optional[str] = None
    template: Literal["math", "code", "none", "auto"] = "auto"
    chat_template: bool = True
    max_prompt_length: int = 2048
    truncation: Literal["left", "filter"] = "left"
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = None  # None → repeat forever
    worker_count: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)

    def validate(self, key: str = "data") -> None:
        check(self.max_prompt_length > 0, f"{key}.max_prompt_length", "must be > 0")
        check(self.worker_count >= 0, f"{key}.worker_count", "must be >= 0")
        check(self.num_epochs is None or self.num_epochs > 0, f"{key}.num_epochs", "must be > 0")
        check(list(self.length_buckets) == sorted(self.length_buckets) and
              all(b > 0 for b in self.length_buckets), f"{key}.length_buckets",
              "must be positive and increasing")


@dataclass(frozen=True)
class SandboxSettings:
    """How code rewards run untrusted programs."""

    # required: refuse to run code rewards when no isolating backend (namespaces as root,
    # bubblewrap) works here; best_effort: run them unisolated then (rlimits only), warned once
    isolation: Literal["required", "best_effort"] = "required"


@dataclass(frozen=True)
class RewardsConfig:
    """Reward scoring settings."""

    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
