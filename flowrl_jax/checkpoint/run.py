"""What a training run's checkpoint holds, and how a run resumes from it.

`RunCheckpoint` owns RUN/checkpoints: `model.json` (so `load_model` and `convert orbax-to-hf`
read the run), and per saved step (checkpoint/manager.py writes them atomically, async):
  policy — the policy params as a pure dict (the layout of checkpoint/orbax.py);
  train  — the rest of the train state: step, skipped, rng, opt_state and the params of
           every other role (Z-network, critic);
  meta   — step, data-iterator state, the rollout pipeline's state, metric history, the
           run's fingerprint and the time.
The fingerprint is the part of the config a resumed run must not change (algorithm, seed,
batch geometry, dtypes); with model.json's architecture it is compared with the config before
anything is restored, and a mismatch is a ConfigError naming every differing key that touches
nothing (checkpoint/manager.py also compares the stored array shapes). A run never starts
again from step 0 over step directories or set-aside checkpoints. The train state is any object
with `params` (by role, "policy" an nnx.State), `step`, `skipped`, `rng`, `opt_state` and
`replace(**fields)` (rl/train_state.py's TrainState). Its `rollout_step` counter (rollout
steps completed) is not a separate entry: it equals meta's step, written in the same
atomic checkpoint, and the trainer sets it from `Resumed.step` (so checkpoints written
before the counter existed restore unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flax import nnx

from flowrl_jax.checkpoint.manager import TrainCheckpointManager
from flowrl_jax.checkpoint.orbax import MODEL_JSON, RUN_CHECKPOINTS, write_model_json
from flowrl_jax.config import Config, ConfigError, ModelArch
from flowrl_jax.errors import CheckpointError
from flowrl_jax.paths import as_path

#: fingerprint key → the config key an error names
_CONFIG_KEY = {"algo": "algo.name", "seed": "seed", "prompts_per_step": "rollout.prompts_per_step",
               "samples_per_prompt": "rollout.samples_per_prompt",
               "mini_batch_size": "trainer.mini_batch_size", "param_dtype": "model.param_dtype",
               "compute_dtype": "model.compute_dtype"}


@dataclass
class Resumed:
    """What `RunCheckpoint.restore` gives back: the state at the end of rollout step `step`."""

    step: int
    state: Any
    data_state: Optional[Any]
    history: list[dict]
    rollout_state: Optional[Any] = None  # the rollout pipeline's (None before it existed)


def fingerprint(cfg: Config) -> dict:
    """The config values a resumed run must share with the run it continues."""
    return {"algo": cfg.algo.name, "seed": cfg.seed,
            "prompts_per_step": cfg.rollout.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "mini_batch_size": cfg.trainer.mini_batch_size,
            "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype}


def _mismatch(out: Any, diffs: list[tuple[str, Any, Any]]) -> ConfigError:
    """One line naming every (config key, saved, now) difference."""
    parts = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diffs)
    return ConfigError(f"the run in {out} was started with other settings ({parts}); nothing "
                       "was changed: rerun with the original settings, or use a new --out")


def check_saved_model(out: str | Path, arch: ModelArch, param_dtype: str) -> None:
    """ConfigError when OUT/checkpoints/model.json (the architecture and parameter dtype the
    run's checkpoints hold) differs from the config's; no model.json or no step, no check."""
    p = as_path(out) / RUN_CHECKPOINTS / MODEL_JSON
    try:
        if not p.exists() or not any(c.name.isdigit() for c in p.parent.iterdir()):
            return  # nothing saved that a change would not fit
        body = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot be read ({type(e).__name__}: {e}); nothing was "
                              "changed") from e
    saved = dict(body.get("arch") or {})
    now = dataclasses.asdict(arch)
    diffs = [(f"model.arch.{k}", saved[k], v) for k, v in now.items()
             if k in saved and saved[k] != v]
    if "param_dtype" in body and body["param_dtype"] != param_dtype:
        diffs.append(("model.param_dtype", body["param_dtype"], param_dtype))
    if diffs:
        raise _mismatch(out, diffs)


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

    def save(self, step: int, state: Any, data_state: Any, history: list[dict],
             rollout_state: Any = None) -> None:
        """Checkpoint after rollout step `step` (async)."""
        meta = {"step": step, "data_state": data_state, "history": history,
                "fingerprint": fingerprint(self.cfg), "time": time.time()}
        if rollout_state is not None:
            meta["rollout_state"] = rollout_state
        self.manager.save(step, policy_tree(state), train_tree(state), meta)

    def restore(self, state: Any, allow_resume: bool = True,
                arch: Optional[ModelArch] = None) -> Optional[Resumed]:
        """The newest restorable checkpoint laid into `state`'s structure; None for a fresh run.

        Refuses (touching nothing) when the checkpoints were made with other settings, and
        never returns None while step directories or set-aside checkpoints exist (a fresh
        start there needs --no-resume, which still refuses over restorable steps)."""
        steps = self.manager.all_steps()
        if not steps:
            stray, aside = self.manager.step_dirs(), self.manager.set_aside()
            if stray:
                raise CheckpointError(f"--out {self.out} holds step directories {stray} that "
                                      f"are not complete checkpoints in {self.dir}; the run does "
                                      "not restart from step 0 over them: move them away or "
                                      "use a new --out")
            if aside and allow_resume:
                raise CheckpointError(f"--out {self.out} holds checkpoints set aside as corrupt "
                                      f"in {self.manager.set_aside_dir} ({', '.join(aside)}); the "
                                      "run does not restart from step 0 over them: use a new "
                                      "--out, or --no-resume to start again from step 0 here")
            return None
        if not allow_resume:
            raise ConfigError(f"--out {self.out}: holds checkpoints {steps} but resuming was "
                              "disabled")
        if arch is not None:
            check_saved_model(self.out, arch, self.cfg.model.param_dtype)
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
                       list(meta.get("history", [])), meta.get("rollout_state"))

    def _check_fingerprint(self, meta: dict) -> None:
        saved = meta.get("fingerprint", {})
        diffs = [(_CONFIG_KEY.get(k, k), saved[k], v) for k, v in fingerprint(self.cfg).items()
                 if k in saved and saved[k] != v]
        if diffs:
            raise _mismatch(self.out, diffs)

    def wait(self) -> None:
        """Block until pending async saves are written."""
        self.manager.wait()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.close()
