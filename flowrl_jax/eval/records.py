"""What flows through an evaluation: problems in, generations out, and the sample record
written to ``samples.jsonl`` (its keys are a fixed interface)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from flowrl_jax.errors import EvalError  # noqa: F401 (re-exported)

# "gold": the reference answer (None for code, whose gold is a test suite); "extracted": the
# answer read from the response (last \\boxed{}, else a final "Answer:"; None for code).
SAMPLE_KEYS = ("benchmark", "prompt_id", "sample_index", "text", "num_tokens", "score",
               "finish_reason", "data_source", "gold", "extracted")


@dataclass(frozen=True)
class Problem:
    """One evaluation problem, ready for the backend."""

    benchmark: str
    prompt_id: str
    prompt: Any  # whatever the backend takes: token ids or rendered text
    ground_truth: Any
    data_source: str
    problem_text: str = ""


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    prompt_index: int
    sample_index: int
    text: str
    num_tokens: int
    finish_reason: str


class Backend(Protocol):
    """Generates n responses for each prompt of a batch with a given seed."""

    def generate(self, prompts: Sequence[Any], n: int, seed: int) -> list[Generation]:
        """Return len(prompts)·n generations (any order)."""
        ...
