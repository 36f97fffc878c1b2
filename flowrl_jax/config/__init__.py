"""The run's settings: frozen dataclass configs for every section, loaded from YAML with
includes and dotted overrides.

A config file is YAML whose top-level keys are the sections of `Config`. It may name other
files under `include:` (paths relative to it, merged first, later files win). Command-line
overrides are `section.key=value` strings, parsed as YAML scalars. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the dotted key.

One module per concept: the sections (arch, model + mesh, data + rewards, rollout + eval,
training: algo, optimizer, trainer), each dataclass next to the `validate` that checks it;
`root` (the whole run); `mapping` (YAML values ⇄ the dataclasses, walking their annotations);
`loader` (files, includes, overrides, presets). Import the names from here.
"""

from flowrl_jax.config.arch import ModelArch
from flowrl_jax.config.data import DataConfig, DatasetSpec, RewardsConfig, SandboxSettings
from flowrl_jax.config.loader import (CONFIG_DIR, apply_overrides, config_from_dict, load_config,
                                      load_yaml_tree, preset_arch, preset_tree,
                                      resolve_config_path)
from flowrl_jax.config.mapping import build_dataclass, config_to_dict, replace
from flowrl_jax.config.model import (ATTENTION, DTYPES, REMAT, MeshConfig, ModelConfig,
                                     remat_policy_name)
from flowrl_jax.config.root import Config
from flowrl_jax.config.rollout import EvalConfig, RolloutConfig
from flowrl_jax.config.training import AlgoConfig, OptimizerConfig, TrainerConfig
from flowrl_jax.errors import ConfigError

__all__ = [
    "ATTENTION", "CONFIG_DIR", "DTYPES", "REMAT", "AlgoConfig", "Config", "ConfigError",
    "DataConfig", "DatasetSpec", "EvalConfig", "MeshConfig", "ModelArch", "ModelConfig",
    "OptimizerConfig", "RewardsConfig", "RolloutConfig", "SandboxSettings", "TrainerConfig",
    "apply_overrides", "build_dataclass", "config_from_dict", "config_to_dict", "load_config",
    "load_yaml_tree", "preset_arch", "preset_tree", "remat_policy_name", "replace",
    "resolve_config_path",
]
