"""`Config`: the whole run, one field per section, and the checks across sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flowrl_jax.config.check import check
from flowrl_jax.config.data import DataConfig, RewardsConfig
from flowrl_jax.config.model import MeshConfig, ModelConfig
from flowrl_jax.config.rollout import EvalConfig, RolloutConfig
from flowrl_jax.config.training import AlgoConfig, OptimizerConfig, TrainerConfig


@dataclass(frozen=True)
class Config:
    """The whole run."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    task: dict[str, Any] = field(default_factory=dict)  # free-form options of a task (demo)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        check(self.trainer.mini_batch_size <= self.rollout.prompts_per_step *
              self.rollout.samples_per_prompt, "trainer.mini_batch_size",
              "is larger than the rollout batch (prompts_per_step × samples_per_prompt)")
