"""What a training run's checkpoint holds, and how a run resumes from it.

`RunCheckpoint` owns RUN/checkpoints: `model.json` (so `load_model` and `convert orbax-to-hf`
read the run), and per saved step (checkpoint/manager.py writes them atomically, async):
  policy — the policy params as a pure dict (the layout of checkpoint/orbax.py);
  train  — the rest of the train state: step, skipped, rng, opt_state and the params of
           every other role (Z-network, critic);
  meta   — step, data-iterator state, metric history, the run's fingerprint and the time.
The fingerprint is the part of the config a resumed run must not change (algorithm, seed,
batch geometry); a mismatch is a ConfigError naming the key. The train state is any object
with `params` (by role, "policy" an nnx.State), `step`, `skipped`, `rng`, `opt_state` and
`replace(**fields)` (rl/train_state.py's TrainState). Its `rollout_step` counter (rollout
steps completed) is not a separate entry: it equals meta's step, written in the same
atomic checkpoint, and the trainer sets it from `Resumed.step` (so checkpoints written
before the counter existed restore unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flax import nnx

from flowrl_jax.checkpoint.manager import TrainCheckpointManager
from flowrl_jax.checkpoint.orbax import RUN_CHECKPOINTS, write_model_json
from flowrl_jax.config import Config, ConfigError, ModelArch
from flowrl_jax.paths import as_path

#: fingerprint key → the config key an error names
_CONFIG_KEY = {"algo": "algo.name", "seed": "seed"}


@dataclass
class Resumed:
    """What `RunCheckpoint.restore` gives back: the state at the end of rollout step `step`."""

    step: int
    state: Any
    data_state: Optional[Any]
    history: list[dict]


def fingerprint(cfg: Config) -> dict:
    """The config values a resumed run must share with the run it continues."""
    return {"algo": cfg.algo.name, "seed": cfg.seed,
            "prompts_per_step": cfg.rollout.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "mini_batch_size": cfg.trainer.mini_batch_size}


def policy_tree(state: Any) -> Any:
    """The `policy` item: the policy params as a pure dict."""
    return nnx.to_pure_dict(state.params["policy"])


def train_tree(state: Any) -> dict:
    """The `train` item: everything else the state needs to continue bit-exactly."""
    return {"step": state.step, "skipped": state.skipped, "rng": state.rng,
            "opt_state": state.opt_state,
            "params": {k: v for k, v in state.params.items() if k != "policy"}}


class RunCheckpoint:
    """The checkpoints of the run in `out` (see module docstring)."""

    def __init__(self, out: str | Path, cfg: Config):
        self.out = as_path(out)
        self.dir = self.out / RUN_CHECKPOINTS
        self.cfg = cfg
        self.manager = TrainCheckpointManager(str(self.dir), cfg.trainer.keep_last,
                                              cfg.trainer.keep_every)

    def write_model_json(self, arch: ModelArch) -> None:
        """model.json makes the run readable by `load_model` and `convert orbax-to-hf`."""
        write_model_json(self.dir, arch, self.cfg.model.param_dtype)

    def save(self, step: int, state: Any, data_state: Any, history: list[dict]) -> None:
        """Checkpoint after rollout step `step` (async)."""
        meta = {"step": step, "data_state": data_state, "history": history,
                "fingerprint": fingerprint(self.cfg), "time": time.time()}
        self.manager.save(step, policy_tree(state), train_tree(state), meta)

    def restore(self, state: Any, allow_resume: bool = True) -> Optional[Resumed]:
        """The newest restorable checkpoint laid into `state`'s structure, or None."""
        steps = self.manager.all_steps()
        if not steps:
            return None
        if not allow_resume:
            raise ConfigError(f"--out {self.out}: holds checkpoints {steps} but resuming was "
                              "disabled")
        got = self.manager.restore_latest(policy_tree(state), train_tree(state),
                                          check=self._check_fingerprint)
        if got is None:
            return None
        _, policy, train, meta = got
        pol = state.params["policy"]
        nnx.replace_by_pure_dict(pol, policy)
        state = state.replace(step=train["step"], skipped=train["skipped"], rng=train["rng"],
                              opt_state=train["opt_state"], params=dict(train["params"], policy=pol))
        return Resumed(int(meta["step"]), state, meta.get("data_state"),
                       list(meta.get("history", [])))

    def _check_fingerprint(self, meta: dict) -> None:
        saved = meta.get("fingerprint", {})
        diff = {k: (saved.get(k), v) for k, v in fingerprint(self.cfg).items()
                if k in saved and saved[k] != v}
        if diff:
            key = next(iter(diff))
            raise ConfigError(f"{_CONFIG_KEY.get(key, key)}: the run in {self.out} was started "
                              f"with {diff[key][0]!r}, now {diff[key][1]!r}; use a new --out to "
                              "change it")

    def wait(self) -> None:
        """Block until pending async saves are written."""
        self.manager.wait()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.close()
