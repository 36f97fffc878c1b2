"""Rewards: math (DAPO "Answer:" exact match; Math-Verify), sandboxed code execution, registry.

Public interface: `score(data_source, response, ground_truth) -> float`, `register_reward`,
`RewardPool` (concurrent scoring), `run_python` (the sandbox; `SandboxError` when it cannot be set up).
"""

from flowrl_jax.rewards.code_reward import CodeLimits, extract_code, outputs_match, score_code
from flowrl_jax.rewards.math_dapo import math_dapo_score, normalize_final_answer
from flowrl_jax.rewards.math_eval import MathVerifyScorer, math_verify_score
from flowrl_jax.rewards.pool import RewardPool, runs_code
from flowrl_jax.rewards.registry import (
    available_rewards,
    get_reward,
    register_alias,
    register_reward,
    resolve,
    score,
    unregister_reward,
)
from flowrl_jax.rewards.sandbox import RunResult, SandboxConfig, isolation_mode, run_python
from flowrl_jax.rewards.sandbox_mounts import SandboxError

__all__ = [
    "CodeLimits", "MathVerifyScorer", "RewardPool", "RunResult", "SandboxConfig", "SandboxError",
    "available_rewards", "extract_code", "get_reward", "isolation_mode", "math_dapo_score",
    "math_verify_score", "normalize_final_answer", "outputs_match", "register_alias",
    "register_reward", "resolve", "run_python", "runs_code", "score", "score_code",
    "unregister_reward",
]
