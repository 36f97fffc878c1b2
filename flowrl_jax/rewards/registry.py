"""Reward registry keyed by data source; `score(data_source, response, ground_truth) -> float`."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from flowrl_jax.rewards.code_reward import score_code
from flowrl_jax.rewards.math_dapo import math_dapo_score
from flowrl_jax.rewards.math_eval import math_verify_score

RewardFn = Callable[[str, Any], float]  # (response, ground_truth) -> reward

_REGISTRY: dict[str, RewardFn] = {}
_ALIASES: dict[str, str] = {}
_lock = threading.Lock()


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Register `fn(response, ground_truth) -> float` under `name`; usable as a decorator."""
    def deco(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"register_reward({name!r}): {f!r} is not callable")
        with _lock:
            if not overwrite and (name in _REGISTRY or name in _ALIASES):
                raise ValueError(f"register_reward: {name!r} is already registered "
                                 "(pass overwrite=True to replace it)")
            _ALIASES.pop(name, None)
            _REGISTRY[name] = f
        return f
    return deco if fn is None else deco(fn)


def register_alias(alias: str, target: str) -> None:
    """Route data source `alias` to the reward registered as `target`."""
    with _lock:
        if target not in _REGISTRY:
            raise KeyError(f"register_alias: unknown target reward {target!r}")
        _ALIASES[alias] = target


def unregister_reward(name: str) -> None:
    """Remove a reward or alias (mainly for tests)."""
    with _lock:
        _REGISTRY.pop(name, None)
        _ALIASES.pop(name, None)


def resolve(data_source: str) -> str:
    """Canonical reward name of a data source (aliases followed)."""
    key = str(data_source)
    with _lock:
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            known = sorted(set(_REGISTRY) | set(_ALIASES))
            raise KeyError(f"no reward registered for data_source {data_source!r}; known: {known}")
    return key


def get_reward(data_source: str) -> RewardFn:
    """The reward function for `data_source`."""
    name = resolve(data_source)
    with _lock:
        return _REGISTRY[name]


def available_rewards() -> dict[str, str]:
    """Every accepted data source → canonical reward name."""
    with _lock:
        out = {k: k for k in _REGISTRY}
        out.update(_ALIASES)
        return out


def score(data_source: str, response: str, ground_truth: Any) -> float:
    """Reward of `response` for a prompt of `data_source` with gold `ground_truth`."""
    return float(get_reward(data_source)(response, ground_truth))


# ---------------------------------------------------------------- built-in rewards
register_reward("math_dapo", math_dapo_score)
register_reward("math_verify", math_verify_score)
for _src in ("livecodebench", "codeforces", "humanevalplus", "humaneval"):
    register_reward(_src, functools.partial(score_code, _src))
for _alias in ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k"):
    register_alias(_alias, "math_verify")
for _alias in ("dapo_math_17k", "math_train"):
    register_alias(_alias, "math_dapo")
register_alias("lcb", "livecodebench")
register_alias("humaneval_plus", "humanevalplus")
