"""The experiment's runs as data: name → config overrides on top of configs/countdown.yaml.

A run whose overrides the config loader rejects (a switch this build does not have) is
reported as "not available in this build" instead of failing the experiment; once the
switch exists it runs with no code change.
"""

from __future__ import annotations

from typing import Optional

from flowrl_jax.config import ConfigError, load_config

#: the four algorithms on the same budget (FlowRL at the config's β = 15)
ALGORITHM_RUNS: dict[str, list[str]] = {
    "flowrl": ["algo.name=flowrl"],
    "grpo": ["algo.name=grpo"],
    "reinforce_pp": ["algo.name=reinforce_pp"],
    "ppo": ["algo.name=ppo"],
}

#: the paper's FlowRL ablations (β = 15 is the `flowrl` run itself)
ABLATION_RUNS: dict[str, list[str]] = {
    "flowrl_is_one": ["algo.name=flowrl", "algo.importance_weight=one"],
    "flowrl_logz_zero": ["algo.name=flowrl", "algo.log_z=zero"],
    "flowrl_logz_scalar": ["algo.name=flowrl", "algo.log_z=scalar"],
    "flowrl_no_length_norm": ["algo.name=flowrl", "algo.length_norm=false"],
    "flowrl_beta5": ["algo.name=flowrl", "algo.beta=5"],
    "flowrl_beta30": ["algo.name=flowrl", "algo.beta=30"],
}

#: the β sweep as the report shows it (run name per β)
BETA_SWEEP: dict[float, str] = {5.0: "flowrl_beta5", 15.0: "flowrl", 30.0: "flowrl_beta30"}

UNAVAILABLE = "not available in this build"


def all_runs() -> dict[str, list[str]]:
    """Every run of the experiment, algorithms first."""
    return {**ALGORITHM_RUNS, **ABLATION_RUNS}


def unavailable_reason(config: str, overrides: list[str]) -> Optional[str]:
    """None when the config loader accepts the overrides, else its message."""
    try:
        load_config(config, overrides)
    except ConfigError as e:
        return str(e)
    return None
