"""The policy forward that the train step and the log-prob pass share, and its batch checks.

The batch is a mapping of arrays in the layout of `rl.rollout_batch.RolloutBatch` (B rows,
prompt LEFT-padded to P ++ response RIGHT-padded to R, T = P + R); the forward reads
input_ids [B, T], attention_mask [B, T], response_mask [B, R] (R from its shape, so
P = T − R ≥ 1) and, optionally, positions [B, T] (default cumsum(attention_mask) − 1, right
for a left-padded prompt followed directly by the response).

Response token t (column P + t) is scored by the hidden state at column P + t − 1:
log π(y_t) = log_softmax(h_{P+t−1} · W_lm / T_rollout)[y_t], computed by
`algos.common.token_logprobs_from_hidden` in sequence chunks (never a [B, T, V] float32
block for the whole sequence).

Both passes cut a batch into micro-batches *strided* (micro-batch i = rows i, i + n,
i + 2n, ...), so each keeps the batch's data/fsdp sharding without moving rows between
devices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flowrl_jax import cpu_runtime
from flowrl_jax.algos.common import token_logprobs_from_hidden
from flowrl_jax.config import Config
from flowrl_jax.mesh import named_sharding
from flowrl_jax.models.attention import no_cache_kernel, require_contiguous_rows

Array = jax.Array
Batch = Mapping[str, Array]

#: keys the model forward reads
MODEL_KEYS = ("input_ids", "attention_mask", "positions", "response_mask")
#: per-response-token keys: shape [B, R]
TOKEN_KEYS = ("response_mask", "old_logp", "ref_logp", "advantages", "returns", "old_values")
#: one [B, chunk, V] float32 logits block stays under this many elements (512 MiB)
LOGITS_BLOCK_ELEMS = 2 ** 27


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


def signature(batch: Mapping[str, Array]) -> tuple:
    """(key, shape, dtype) of every entry: what a compiled pass is specialised to."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def to_micro(x: Array, n: int) -> Array:
    """[B, ...] → [n, B/n, ...] strided: micro-batch i holds rows i, i+n, i+2n, ..."""
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)


def from_micro(x: Array) -> Array:
    """Inverse of `to_micro`: [n, m, ...] → [n·m, ...]."""
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def logprob_chunk(cfg: Config, batch: int, length: int, vocab: int) -> int:
    """Sequence chunk for the chunked log-probs: ≤ trainer.logprob_chunk and one
    [batch, chunk, V] float32 block ≤ LOGITS_BLOCK_ELEMS, balanced to avoid padding."""
    cmax = max(1, min(cfg.trainer.logprob_chunk, LOGITS_BLOCK_ELEMS // max(1, batch * vocab), length))
    n = -(-length // cmax)
    return -(-length // n)


def forward(cfg: Config, graphdefs: Mapping[str, Any], params: Mapping[str, Any], batch: Batch,
            *, train: bool = False, key: Optional[Array] = None,
            with_entropy: bool = False) -> dict[str, Array]:
    """Policy forward (+ Z_φ / value head / critic model when their params are given) →
    algorithm outputs.

    Returns logp [B, R] (and entropy [B, R] with `with_entropy`), log_z [B] when
    params has "z" (pooled over the prompt columns of `z_pool_length`), values [B, R] when
    params has "value".
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
        pz = z_pool_length(cfg, p)
        outputs["log_z"] = znet(hidden[:, :pz], am[:, :pz], deterministic=not train, key=key)
    if "value" in params:
        head = nnx.merge(graphdefs["value"], params["value"])
        if "critic" in params:  # a separate critic model (algo.critic: model)
            critic = nnx.merge(graphdefs["critic"], params["critic"])
            c_out = critic(ids, am, batch.get("positions"), return_logits=False,
                           remat=None if train else False)
            outputs["values"] = head(c_out.hidden[:, p - 1:t - 1])
        else:
            outputs["values"] = head(h_resp)
    return outputs


def z_pool_length(cfg: Config, prompt_columns: int) -> int:
    """How many leading prompt columns Z_φ pools: all, or all but the last one
    (`algo.z_pool: prompt_but_last`, the official slice; prompts are left-padded, so the
    last column is every row's last prompt token)."""
    if getattr(cfg.algo, "z_pool", "prompt_but_last") == "prompt_but_last":
        return prompt_columns - 1
    return prompt_columns


def widest_layer(policy_params: Any) -> int:
    """The largest dimension of the policy's 2-D weights other than the vocabulary (the MLP
    width): activations are at most [rows, tokens, this] outside the LM head."""
    flat = jax.tree_util.tree_flatten_with_path(policy_params)[0]
    shapes = []
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if any(n in key for n in ("embed_tokens", "lm_head")):
            continue
        # scanned layers (qwen2.DecoderStack): one weight per layer along the leading axis
        shapes.append(tuple(leaf.shape)[1:] if "stacked" in key else tuple(leaf.shape))
    return max((d for s in shapes if len(s) == 2 for d in s), default=1)


def pass_compiler_options(mesh: Mesh, width: int, rows: int, tokens: int) -> Optional[dict[str, str]]:
    """XLA options for a model pass over [rows, tokens] whose widest layer is `width`
    (cpu_runtime decides by the size of the largest activation)."""
    return cpu_runtime.model_pass_compiler_options(mesh.devices.flat[0].platform,
                                                   rows * tokens * width)
