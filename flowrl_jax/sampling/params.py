"""How to sample: the request-level parameters (`SamplingParams`), their compiled part
(`SamplingSpec`), and the error a request that cannot be served raises."""

from __future__ import annotations

from dataclasses import dataclass

from flowrl_jax.config import RolloutConfig
from flowrl_jax.errors import SamplingError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: greedy when temperature == 0; top_k == 0 / top_p == 1 / min_p == 0 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise SamplingError naming the first impossible field."""
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p", "must be in [0, 1)"),
            (self.max_new_tokens > 0, "max_new_tokens", "must be > 0"),
            (self.n > 0, "n", "must be > 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise SamplingError(f"SamplingParams.{name}={getattr(self, name)!r}: {msg}")

    @classmethod
    def from_rollout_config(cls, cfg: RolloutConfig, seed: int = 0) -> "SamplingParams":
        """Sampling parameters of an RL rollout step (`cfg.rollout`); pass a per-step seed."""
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                   max_new_tokens=cfg.max_new_tokens, n=cfg.samples_per_prompt, seed=seed,
                   ignore_eos=cfg.ignore_eos, stop_token_ids=tuple(cfg.stop_token_ids))


@dataclass(frozen=True)
class SamplingSpec:
    """The static (compile-time) part of sampling: one compiled decode per distinct spec."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float

    @classmethod
    def of(cls, sampling: SamplingParams) -> "SamplingSpec":
        """The compiled part of `sampling`."""
        return cls(float(sampling.temperature), float(sampling.top_p), int(sampling.top_k),
                   float(sampling.min_p))
