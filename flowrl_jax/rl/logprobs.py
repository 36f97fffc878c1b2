"""The no-grad log-prob pass: old (current params) and reference log-probs of a batch."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from flowrl_jax.config import Config
from flowrl_jax.mesh import activation_sharding, named_sharding
from flowrl_jax.rl.forward import (MODEL_KEYS, batch_shardings, check_attention_layout,
                                   check_batch, forward, from_micro, pass_compiler_options,
                                   signature, to_micro, widest_layer)
from flowrl_jax.rl.rollout_batch import RolloutBatch
from flowrl_jax.rl.train_state import TrainState, tree_shardings

Array = jax.Array


class LogProbs:
    """`out = logprobs(params, batch)`: no-grad per-token log-probs, in micro-batches.

    params: {"policy": State} (+ "value": State for PPO values), e.g. `state.params` for old
    log-probs or `reference_params(state)` for ref log-probs. Only input_ids,
    attention_mask, positions and response_mask are read. Returns {"logp": [B, R]} plus
    "values" [B, R] when params has "value" and "entropy" [B, R] with `with_entropy`.
    B need not divide `trainer.logprob_micro_batch_size` (rows are padded and dropped).
    """

    def __init__(self, cfg: Config, graphdefs: Mapping[str, Any] | TrainState, mesh: Mesh,
                 with_entropy: bool = False):
        if isinstance(graphdefs, TrainState):
            graphdefs = dict(graphdefs.graphdefs)
        self.cfg, self.mesh, self.with_entropy = cfg, mesh, with_entropy
        self.graphdefs = dict(graphdefs)
        self._fns: dict[tuple, Callable] = {}

    def _run(self, params: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        with activation_sharding(self.mesh):  # activations sharded by the mesh's rules
            return self._run_traced(params, batch)

    def _run_traced(self, params: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        b = batch["input_ids"].shape[0]
        n = b // min(b, self.cfg.trainer.logprob_micro_batch_size)
        params = {k: v for k, v in params.items() if k != "z"}
        micro = {k: to_micro(v, n) for k, v in batch.items()}

        def one(mbatch):
            return forward(self.cfg, self.graphdefs, params, mbatch, train=False,
                           with_entropy=self.with_entropy)

        return {k: from_micro(v) for k, v in lax.map(one, micro).items()}

    def compiled(self, params: Mapping[str, Any], batch: Mapping[str, Any]) -> Callable:
        """The jitted pass for these params and a batch whose rows are a multiple of the
        log-prob micro-batch (built on first use; arrays or ShapeDtypeStructs, so it also
        lowers ahead of time on abstract inputs)."""
        params = dict(params)
        sig = (signature(batch), tuple(sorted(params)))
        fn = self._fns.get(sig)
        if fn is None:
            b, t = batch["input_ids"].shape
            r = batch["response_mask"].shape[1]
            mb = min(b, self.cfg.trainer.logprob_micro_batch_size)
            if b % mb:
                raise ValueError(f"compute_logprobs: {b} rows are not a multiple of "
                                 f"trainer.logprob_micro_batch_size={mb}")
            out_sh = named_sharding(self.mesh, ("batch", None), (b, r))
            options = pass_compiler_options(self.mesh, widest_layer(params["policy"]), mb, t)
            fn = jax.jit(self._run, in_shardings=(tree_shardings(params, self.mesh),
                                                  batch_shardings(batch, self.mesh)),
                         out_shardings=out_sh, compiler_options=options)
            self._fns[sig] = fn
        return fn

    def __call__(self, params: Mapping[str, Any],
                 batch: Union[RolloutBatch, Mapping[str, Any]]) -> dict[str, Array]:
        if isinstance(batch, RolloutBatch):
            batch = batch.model_inputs()
        batch = check_batch({k: batch[k] for k in MODEL_KEYS if k in batch}, "compute_logprobs")
        check_attention_layout(self.cfg, batch, "compute_logprobs")
        b = batch["input_ids"].shape[0]
        mb = min(b, self.cfg.trainer.logprob_micro_batch_size)
        pad = (-b) % mb
        if pad:  # zero rows (all masked) up to a multiple of the micro-batch, dropped below
            batch = {k: jnp.concatenate([jnp.asarray(v), jnp.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        params = dict(params)
        fn = self.compiled(params, batch)
        batch = jax.device_put(batch, batch_shardings(batch, self.mesh))
        out = fn(params, batch)
        return {k: v[:b] for k, v in out.items()} if pad else out


def make_compute_logprobs(cfg: Config, state: TrainState, mesh: Mesh,
                          with_entropy: bool = False) -> LogProbs:
    """`compute_logprobs(params, batch) -> {"logp": [B, R], ("values", "entropy")}`."""
    return LogProbs(cfg, state, mesh, with_entropy)
