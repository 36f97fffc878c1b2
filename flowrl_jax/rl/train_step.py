"""The jitted, sharded train step: one optimizer update on a mini-batch.

The batch is a `RolloutBatch` (rl/rollout_batch.py) or a mapping of its arrays: the model
inputs (rl/forward.py) plus what the algorithm's loss reads (old_logp, ref_logp, rhat,
advantages, returns, old_values, rewards, group_ids, seq_mask; seq_mask 0 = padding row).

Micro-batches and how losses add up
-----------------------------------
A mini-batch of B sequences is cut into B / `trainer.micro_batch_size` micro-batches
*strided* (micro-batch i = rows i, i + n, i + 2n, ...), so each micro-batch keeps the
batch's data/fsdp sharding without moving rows between devices. A `lax.scan` runs
forward + backward per micro-batch and sums the gradients. Each micro-batch's loss is
weighted by its share of the mini-batch's normaliser: valid *tokens* or valid
*sequences*, as the algorithm's `loss_unit` says (algos/base.py). Loss and gradient are then
exactly those of one pass over the whole mini-batch (tested), whatever the padding.
Metrics from the algorithm are weighted the same way; num_seqs/num_tokens are summed.

Non-finite guard: if the loss or any gradient is NaN/inf, the update is skipped inside
the step (a leaf-wise select of the old values, fused with the update): params and optimizer state come back bit-identical, `step` stays,
`skipped` increments and the metric `skipped` is 1.

Metrics (scalars): the algorithm's own (e.g. FlowRL loss, delta_mean, log_z_mean, w_mean,
clip_frac, kl_old, kl_ref, ...), plus loss, grad_norm (global, before clipping),
grad_norm_<role>, lr (policy lr of this update, after warm-up: rl/train_state.py), skipped, skipped_total, step, tokens
(valid response tokens), seqs (valid sequences), input_tokens (all real tokens, for
throughput).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from flowrl_jax.algos import get_algorithm
from flowrl_jax.algos.base import seq_valid
from flowrl_jax.config import Config
from flowrl_jax.mesh import activation_sharding, named_sharding, replicated
from flowrl_jax.rl.forward import (Batch, batch_shardings, check_attention_layout, check_batch,
                                   forward, pass_compiler_options, signature, to_micro,
                                   widest_layer)
from flowrl_jax.rl.rollout_batch import RolloutBatch
from flowrl_jax.rl.train_state import (TrainState, adamw_updates, lr_scale, make_optimizer,
                                       tree_shardings)

Array = jax.Array

#: summed (not averaged) across micro-batches
COUNT_METRICS = ("num_seqs", "num_tokens")


def count_units(batch: Batch) -> tuple[Array, Array]:
    """(valid response tokens, valid sequences) of a batch, float32."""
    mask = jnp.asarray(batch["response_mask"]).astype(jnp.float32)
    valid = seq_valid(batch, mask)
    return jnp.sum(mask * valid[:, None]), jnp.sum(valid.astype(jnp.float32))


class TrainStep:
    """`state, metrics = step(state, batch)`: one optimizer update on a mini-batch.

    Compiled once per batch signature (keys, shapes, dtypes) with explicit shardings from
    the mesh rules; the state argument is donated.
    """

    def __init__(self, cfg: Config, state: TrainState, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.algo = get_algorithm(cfg.algo.name)
        self.graphdefs = dict(state.graphdefs)
        self.roles = tuple(state.params)
        self.tx = make_optimizer(cfg, self.roles)
        self.state_shardings = tree_shardings(state, mesh)
        self.param_shardings = tree_shardings(state.params, mesh)
        self.width = widest_layer(state.params["policy"])
        self._fns: dict[tuple, Callable] = {}

    def num_micro(self, b: int) -> int:
        """Number of micro-batches for a mini-batch of b sequences."""
        mb = self.cfg.trainer.micro_batch_size
        if b <= mb:
            return 1
        if b % mb:
            raise ValueError(f"trainer.micro_batch_size={mb} does not divide the mini-batch of "
                             f"{b} sequences")
        return b // mb

    def _step(self, state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
        with activation_sharding(self.mesh):  # activations sharded by the mesh's rules
            return self._step_traced(state, batch)

    def _step_traced(self, state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
        cfg, algo, mesh = self.cfg, self.algo, self.mesh
        b = batch["input_ids"].shape[0]
        n = self.num_micro(b)
        unit = algo.loss_unit(cfg.algo)
        tokens, seqs = count_units(batch)
        total = jnp.maximum(seqs if unit == "seqs" else tokens, 1.0)
        micro = {k: to_micro(v, n) for k, v in batch.items()}
        micro = {k: lax.with_sharding_constraint(
            v, named_sharding(mesh, (None, "batch") + (None,) * (v.ndim - 2), v.shape))
            for k, v in micro.items()}
        step_key = jax.random.fold_in(state.rng, state.step + state.skipped)

        def loss_fn(params, mbatch, key):
            outputs = forward(cfg, self.graphdefs, params, mbatch, train=True, key=key)
            loss, metrics = algo.loss(cfg.algo, mbatch, outputs)
            tok, sq = count_units(mbatch)
            weight = (sq if unit == "seqs" else tok) / total
            return loss * weight, (metrics, weight)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(acc, xs):
            mbatch, i = xs
            (loss, (metrics, weight)), grads = grad_fn(state.params, mbatch,
                                                       jax.random.fold_in(step_key, i))
            acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
            acc = lax.with_sharding_constraint(acc, self.param_shardings)
            return acc, (loss, metrics, weight)

        if n == 1:  # no accumulator buffer needed
            (loss1, (mets, weights)), grads = grad_fn(state.params, batch,
                                                      jax.random.fold_in(step_key, 0))
            grads = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads)
            losses, mets, weights = loss1[None], jax.tree.map(lambda x: x[None], mets), weights[None]
        else:
            zeros = jax.tree.map(
                lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), state.params)
            zeros = lax.with_sharding_constraint(zeros, self.param_shardings)
            grads, (losses, mets, weights) = lax.scan(body, zeros, (micro, jnp.arange(n)))

        loss = jnp.sum(losses)
        metrics = {k: (jnp.sum(v) if k in COUNT_METRICS else jnp.sum(v * weights))
                   for k, v in mets.items()}
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

        # Skip = select the old values leaf by leaf. Unlike lax.cond this fuses with the
        # elementwise AdamW update and writes in place into the donated buffers (a cond
        # would hold a second copy of params + optimizer state). The parameter update is
        # computed from the moments once they are written (the barrier keeps XLA from
        # recomputing them from the old ones, which would force copies of the old moments).
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        _, opt_state = self.tx.update(grads, state.opt_state, state.params)
        opt_state = lax.optimization_barrier(jax.tree.map(keep, opt_state, state.opt_state))
        updates = adamw_updates(cfg, opt_state, state.params, state.rollout_step)
        params = jax.tree.map(keep, optax.apply_updates(state.params, updates), state.params)
        okf = ok.astype(jnp.int32)
        new_state = state.replace(step=state.step + okf, params=params, opt_state=opt_state,
                                  skipped=state.skipped + (1 - okf))
        metrics.update({
            "loss": loss,
            "grad_norm": gnorm,
            "lr": cfg.optimizer.lr * lr_scale(cfg.optimizer, state.step, state.rollout_step),
            "skipped": (1 - okf).astype(jnp.float32),
            "skipped_total": new_state.skipped,
            "step": new_state.step,
            "tokens": tokens,
            "seqs": seqs,
            "input_tokens": jnp.sum(batch["attention_mask"].astype(jnp.float32)),
        })
        for role in self.roles:
            metrics[f"grad_norm_{role}"] = optax.tree.norm(grads[role])
        return new_state, metrics

    def compiled(self, batch: Mapping[str, Array]) -> Callable:
        """The jitted step for this batch signature (built on first use)."""
        sig = signature(batch)
        fn = self._fns.get(sig)
        if fn is None:
            b, t = batch["input_ids"].shape
            fn = jax.jit(self._step,
                         in_shardings=(self.state_shardings, batch_shardings(batch, self.mesh)),
                         out_shardings=(self.state_shardings, replicated(self.mesh)),
                         donate_argnums=(0,),
                         compiler_options=pass_compiler_options(self.mesh, self.width,
                                                                  b // self.num_micro(b), t))
            self._fns[sig] = fn
        return fn

    def place(self, batch: Union[RolloutBatch, Mapping[str, Any]]) -> dict[str, Array]:
        """Validate a host batch and put it on the mesh in the step's batch shardings."""
        if isinstance(batch, RolloutBatch):
            batch = batch.train_inputs()
        batch = check_batch(batch, f"train_step[{self.cfg.algo.name}]")
        check_attention_layout(self.cfg, batch, f"train_step[{self.cfg.algo.name}]")
        self.num_micro(batch["input_ids"].shape[0])
        return jax.device_put(batch, batch_shardings(batch, self.mesh))

    def __call__(self, state: TrainState, batch: Union[RolloutBatch, Mapping[str, Any]]
                 ) -> tuple[TrainState, dict]:
        batch = self.place(batch)
        return self.compiled(batch)(state, batch)


def make_train_step(cfg: Config, state: TrainState, mesh: Mesh) -> TrainStep:
    """The train step for `cfg.algo.name` and this state's modules on `mesh`."""
    return TrainStep(cfg, state, mesh)
