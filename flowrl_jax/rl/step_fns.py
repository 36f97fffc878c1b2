"""The jitted passes of one rollout step, on host `RolloutBatch`es: old/ref log-probs, the
algorithm's advantages, and one optimizer update per mini-batch."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flowrl_jax.config import Config
from flowrl_jax.distributed import to_host
from flowrl_jax.rl.logprobs import make_compute_logprobs
from flowrl_jax.rl.rollout_batch import ADVANTAGE_KEYS, RolloutBatch
from flowrl_jax.rl.train_step import make_train_step


class StepFns:
    """The train step, the two log-prob passes and the jitted `algo.advantages`."""

    def __init__(self, cfg: Config, algo: Any, state: Any, mesh: Any):
        self.cfg, self.algo = cfg, algo
        self.train = make_train_step(cfg, state, mesh)
        self.old = make_compute_logprobs(cfg, state, mesh, with_entropy=True)
        self.ref = make_compute_logprobs(cfg, state, mesh)
        self._adv = jax.jit(lambda b: algo.advantages(b, cfg.algo))

    def logprobs(self, state: Any, ref: Any, batch: RolloutBatch) -> RolloutBatch:
        """`batch` with old_logp, entropy (+ old_values) under the current params and
        ref_logp under `ref` (the reference policy params, or None), zero off the mask."""
        inputs = batch.model_inputs()
        mask = batch.response_mask.astype(np.float32)
        out = to_host(self.old(state.params, inputs))
        res = {"old_logp": np.asarray(out["logp"], np.float32) * mask,
               "entropy": np.asarray(out["entropy"], np.float32) * mask}
        if "values" in out:
            res["old_values"] = np.asarray(out["values"], np.float32) * mask
        if ref is not None:
            r = to_host(self.ref({"policy": ref}, inputs))
            res["ref_logp"] = np.asarray(r["logp"], np.float32) * mask
        return batch.with_arrays(res)

    def advantages(self, batch: RolloutBatch) -> RolloutBatch:
        """`batch` with the algorithm's batch-level preprocessing (r̂, advantages, returns)."""
        out = jax.device_get(self._adv(batch.select(ADVANTAGE_KEYS)))
        return batch.with_arrays({k: np.asarray(v) for k, v in out.items()})

    def update(self, state: Any, mb: RolloutBatch) -> tuple[Any, dict]:
        """One optimizer update on a host mini-batch."""
        return self.train(state, mb.train_inputs())
