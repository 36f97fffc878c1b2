"""The jitted, sharded train step and the no-grad log-prob pass.

Batch layout (what the trainer builds; every array is indexed by sequence first)
-------------------------------------------------------------------------------
B sequences, each = prompt (LEFT-padded to P) ++ response (RIGHT-padded to R), T = P + R:

  input_ids      [B, T] int    prompt tokens in [:, :P], response tokens in [:, P:]
  attention_mask [B, T] bool/int  1 on real tokens (prompt and response), 0 on padding
  response_mask  [B, R] float/bool  1 on response tokens that count in the loss; R is
                               read from its shape, so P = T − R. [:, :P] of attention_mask
                               is the valid-prompt mask Z_φ pools over.
  positions      [B, T] int    optional; default cumsum(attention_mask) − 1 (right for a
                               left-padded prompt followed directly by the response)
  -- per algorithm (see flowrl_jax/algos/base.py), R = response positions --
  old_logp [B, R], ref_logp [B, R]   from `make_compute_logprobs` (old: current params;
                                      ref: `train_state.reference_params`)
  rhat [B]                            FlowRL (from algo.advantages)
  advantages [B, R], returns [B, R]   GRPO / PPO / REINFORCE++ (from algo.advantages)
  old_values [B, R]                   PPO (the "values" of make_compute_logprobs)
  rewards [B], group_ids [B], seq_mask [B]   optional here (seq_mask 0 = padding row)

Response token t (column P + t) is scored by the hidden state at column P + t − 1:
log π(y_t) = log_softmax(h_{P+t−1} · W_lm / T_rollout)[y_t], computed by
`algos.common.token_logprobs_from_hidden` in sequence chunks (never a [B, T, V] float32
block for the whole sequence). The prompt must be non-empty (P ≥ 1).

Micro-batches and how losses add up
-----------------------------------
A mini-batch of B sequences is cut into B / `trainer.micro_batch_size` micro-batches
*strided* (micro-batch i = rows i, i + n, i + 2n, ...), so each micro-batch keeps the
batch's data/fsdp sharding without moving rows between devices. A `lax.scan` runs
forward + backward per micro-batch and sums the gradients. Each micro-batch's loss is
weighted by its share of the mini-batch's normaliser: valid *tokens* for token-mean
losses (GRPO, PPO, REINFORCE++ with loss_agg_mode=token-mean), valid *sequences* for
FlowRL (a mean over sequences) and the seq-mean-* modes. Loss and gradient are then
exactly those of one pass over the whole mini-batch (tested), whatever the padding.
Metrics from the algorithm are weighted the same way; num_seqs/num_tokens are summed.

Non-finite guard: if the loss or any gradient is NaN/inf, the update is skipped inside
the step (a leaf-wise select of the old values, fused with the update): params and optimizer state come back bit-identical, `step` stays,
`skipped` increments and the metric `skipped` is 1.

Metrics (scalars): the algorithm's own (e.g. FlowRL loss, delta_mean, log_z_mean, w_mean,
clip_frac, kl_old, kl_ref, ...), plus loss, grad_norm (global, before clipping),
grad_norm_<role>, lr (policy lr of this update), skipped, skipped_total, step, tokens
(valid response tokens), seqs (valid sequences), input_tokens (all real tokens, for
throughput).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding

from flowrl_jax import cpu_runtime
from flowrl_jax.algos import get_algorithm
from flowrl_jax.algos.base import seq_valid
from flowrl_jax.algos.common import token_logprobs_from_hidden
from flowrl_jax.config import Config
from flowrl_jax.models.attention import no_cache_kernel, require_contiguous_rows
from flowrl_jax.mesh import named_sharding, replicated
from flowrl_jax.rl.train_state import (TrainState, adamw_updates, make_optimizer, tree_shardings,
                                    warmup_constant)

Array = jax.Array
Batch = Mapping[str, Array]

#: keys the model forward reads
MODEL_KEYS = ("input_ids", "attention_mask", "positions", "response_mask")
#: per-response-token keys: shape [B, R]
TOKEN_KEYS = ("response_mask", "old_logp", "ref_logp", "advantages", "returns", "old_values")
#: summed (not averaged) across micro-batches
COUNT_METRICS = ("num_seqs", "num_tokens")
#: one [B, chunk, V] float32 logits block stays under this many elements (512 MiB)
LOGITS_BLOCK_ELEMS = 2 ** 27


# --------------------------------------------------------------------------- batch checks


def check_batch(batch: Mapping[str, Any], where: str = "batch") -> dict[str, Array]:
    """Validate the layout above; returns the non-None entries as arrays. Errors name the key."""
    out = {k: v for k, v in batch.items() if v is not None}
    for k in ("input_ids", "attention_mask", "response_mask"):
        if k not in out:
            raise KeyError(f"{where}: missing {k!r} (has {sorted(out)})")
    out = {k: (v if isinstance(v, jax.Array) else np.asarray(v)) for k, v in out.items()}
    ids = out["input_ids"]
    if ids.ndim != 2:
        raise ValueError(f"{where}: input_ids must be [B, T], got shape {ids.shape}")
    b, t = ids.shape
    for k in ("attention_mask", "positions"):
        if k in out and tuple(out[k].shape) != (b, t):
            raise ValueError(f"{where}: {k} has shape {tuple(out[k].shape)}, expected {(b, t)}")
    rm = out["response_mask"]
    if rm.ndim != 2 or rm.shape[0] != b or not 0 < rm.shape[1] < t:
        raise ValueError(f"{where}: response_mask must be [B={b}, R] with 0 < R < T={t} "
                         f"(prompt ++ response), got shape {tuple(rm.shape)}")
    r = rm.shape[1]
    for k, v in out.items():
        if v.ndim == 0 or v.shape[0] != b:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}; expected leading dim B={b}")
        if k in TOKEN_KEYS and tuple(v.shape) != (b, r):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, expected [B, R] = {(b, r)}")
    return out


def check_attention_layout(cfg: Config, batch: Mapping[str, Any], where: str) -> None:
    """The fused attention path relies on one contiguous run of real tokens per row."""
    if no_cache_kernel(cfg.model.attention, cfg.model.compute_dtype) != "fused":
        return
    mask = batch["attention_mask"]
    if isinstance(mask, jax.Array):  # possibly global over processes: check the rows held here
        for shard in mask.addressable_shards:
            require_contiguous_rows(shard.data, where, first_row=shard.index[0].start or 0)
    else:
        require_contiguous_rows(mask, where)


def batch_shardings(batch: Mapping[str, Array], mesh: Mesh) -> dict[str, NamedSharding]:
    """Leading (batch) dim over data×fsdp, the rest replicated, for every entry."""
    return {k: named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape)
            for k, v in batch.items()}


def _signature(batch: Mapping[str, Array]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def to_micro(x: Array, n: int) -> Array:
    """[B, ...] → [n, B/n, ...] strided: micro-batch i holds rows i, i+n, i+2n, ..."""
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)


def from_micro(x: Array) -> Array:
    """Inverse of `to_micro`: [n, m, ...] → [n·m, ...]."""
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def loss_unit(cfg: Config) -> str:
    """What the algorithm's loss averages over: 'seqs' (FlowRL, seq-mean-*) or 'tokens'."""
    if cfg.algo.name == "flowrl" or cfg.algo.loss_agg_mode != "token-mean":
        return "seqs"
    return "tokens"


def count_units(batch: Batch) -> tuple[Array, Array]:
    """(valid response tokens, valid sequences) of a batch, float32."""
    mask = jnp.asarray(batch["response_mask"]).astype(jnp.float32)
    valid = seq_valid(batch, mask)
    return jnp.sum(mask * valid[:, None]), jnp.sum(valid.astype(jnp.float32))


# --------------------------------------------------------------------------- forward


def logprob_chunk(cfg: Config, batch: int, length: int, vocab: int) -> int:
    """Sequence chunk for the chunked log-probs: ≤ trainer.logprob_chunk and one
    [batch, chunk, V] float32 block ≤ LOGITS_BLOCK_ELEMS, balanced to avoid padding."""
    cmax = max(1, min(cfg.trainer.logprob_chunk, LOGITS_BLOCK_ELEMS // max(1, batch * vocab), length))
    n = -(-length // cmax)
    return -(-length // n)


def forward(cfg: Config, graphdefs: Mapping[str, Any], params: Mapping[str, Any], batch: Batch,
            *, train: bool = False, key: Optional[Array] = None,
            with_entropy: bool = False) -> dict[str, Array]:
    """Policy forward (+ Z_φ / value head when their params are given) → algorithm outputs.

    Returns logp [B, R] (and entropy [B, R] with `with_entropy`), log_z [B] when
    params has "z", values [B, R] when params has "value".
    """
    ids = batch["input_ids"]
    am = batch["attention_mask"]
    b, t = ids.shape
    r = batch["response_mask"].shape[1]
    p = t - r
    model = nnx.merge(graphdefs["policy"], params["policy"])
    # remat only where a backward pass follows (the old/ref log-prob passes have none)
    out = model(ids, am, batch.get("positions"), return_logits=False, remat=None if train else False)
    hidden = out.hidden
    h_resp = hidden[:, p - 1:t - 1]  # position P+t−1 predicts response token t
    w = model.lm_head_matrix()
    res = token_logprobs_from_hidden(h_resp, w, ids[:, p:], cfg.rollout.temperature,
                                     chunk_size=logprob_chunk(cfg, b, r, w.shape[1]),
                                     return_entropy=with_entropy)
    outputs: dict[str, Array] = {}
    if with_entropy:
        outputs["logp"], outputs["entropy"] = res
    else:
        outputs["logp"] = res
    if "z" in params:
        znet = nnx.merge(graphdefs["z"], params["z"])
        outputs["log_z"] = znet(hidden[:, :p], am[:, :p], deterministic=not train, key=key)
    if "value" in params:
        head = nnx.merge(graphdefs["value"], params["value"])
        outputs["values"] = head(h_resp)
    return outputs


def widest_layer(policy_params: Any) -> int:
    """The largest dimension of the policy's 2-D weights other than the vocabulary (the MLP
    width): activations are at most [rows, tokens, this] outside the LM head."""
    flat = jax.tree_util.tree_flatten_with_path(policy_params)[0]
    shapes = [tuple(leaf.shape) for path, leaf in flat
              if not any(n in jax.tree_util.keystr(path) for n in ("embed_tokens", "lm_head"))]
    return max((d for s in shapes if len(s) == 2 for d in s), default=1)


def pass_compiler_options(mesh: Mesh, width: int, rows: int, tokens: int) -> Optional[dict[str, str]]:
    """XLA options for a model pass over [rows, tokens] whose widest layer is `width`
    (cpu_runtime decides by the size of the largest activation)."""
    return cpu_runtime.model_pass_compiler_options(mesh.devices.flat[0].platform,
                                                   rows * tokens * width)


# --------------------------------------------------------------------------- train step


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
        cfg, algo, mesh = self.cfg, self.algo, self.mesh
        b = batch["input_ids"].shape[0]
        n = self.num_micro(b)
        unit = loss_unit(cfg)
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
        updates = adamw_updates(cfg, opt_state, state.params)
        params = jax.tree.map(keep, optax.apply_updates(state.params, updates), state.params)
        okf = ok.astype(jnp.int32)
        new_state = state.replace(step=state.step + okf, params=params, opt_state=opt_state,
                                  skipped=state.skipped + (1 - okf))
        metrics.update({
            "loss": loss,
            "grad_norm": gnorm,
            "lr": warmup_constant(cfg.optimizer.lr, cfg.optimizer.warmup_steps)(state.step),
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
        sig = _signature(batch)
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

    def place(self, batch: Mapping[str, Any]) -> dict[str, Array]:
        """Validate a host batch and put it on the mesh in the step's batch shardings."""
        batch = check_batch(batch, f"train_step[{self.cfg.algo.name}]")
        check_attention_layout(self.cfg, batch, f"train_step[{self.cfg.algo.name}]")
        self.num_micro(batch["input_ids"].shape[0])
        return jax.device_put(batch, batch_shardings(batch, self.mesh))

    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        batch = self.place(batch)
        return self.compiled(batch)(state, batch)


def make_train_step(cfg: Config, state: TrainState, mesh: Mesh) -> TrainStep:
    """The train step for `cfg.algo.name` and this state's modules on `mesh`."""
    return TrainStep(cfg, state, mesh)


# --------------------------------------------------------------------------- log-probs


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
        b = batch["input_ids"].shape[0]
        n = b // min(b, self.cfg.trainer.logprob_micro_batch_size)
        params = {k: v for k, v in params.items() if k != "z"}
        micro = {k: to_micro(v, n) for k, v in batch.items()}

        def one(mbatch):
            return forward(self.cfg, self.graphdefs, params, mbatch, train=False,
                           with_entropy=self.with_entropy)

        return {k: from_micro(v) for k, v in lax.map(one, micro).items()}

    def __call__(self, params: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Array]:
        batch = check_batch({k: batch[k] for k in MODEL_KEYS if k in batch}, "compute_logprobs")
        check_attention_layout(self.cfg, batch, "compute_logprobs")
        b = batch["input_ids"].shape[0]
        mb = min(b, self.cfg.trainer.logprob_micro_batch_size)
        pad = (-b) % mb
        if pad:  # zero rows (all masked) up to a multiple of the micro-batch, dropped below
            batch = {k: jnp.concatenate([jnp.asarray(v), jnp.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        params = dict(params)
        sig = (_signature(batch), tuple(sorted(params)))
        fn = self._fns.get(sig)
        if fn is None:
            bsh = batch_shardings(batch, self.mesh)
            r = batch["response_mask"].shape[1]
            out_sh = named_sharding(self.mesh, ("batch", None), (b + pad, r))
            options = pass_compiler_options(self.mesh, widest_layer(params["policy"]), mb,
                                            batch["input_ids"].shape[1])
            fn = jax.jit(self._run, in_shardings=(tree_shardings(params, self.mesh), bsh),
                         out_shardings=out_sh, compiler_options=options)
            self._fns[sig] = fn
        batch = jax.device_put(batch, batch_shardings(batch, self.mesh))
        out = fn(params, batch)
        return {k: v[:b] for k, v in out.items()} if pad else out


def make_compute_logprobs(cfg: Config, state: TrainState, mesh: Mesh,
                          with_entropy: bool = False) -> LogProbs:
    """`compute_logprobs(params, batch) -> {"logp": [B, R], ("values", "entropy")}`."""
    return LogProbs(cfg, state, mesh, with_entropy)
