"""Splash attention: JAX's Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
for the no-cache passes (train step, log-probs, prefill) on TPU.

Masks. The kernel takes a static causal mask plus segment ids: key j is visible to query i
iff j <= i and both slots carry the same id. Real tokens get id 1, padding id 0, so a real
query sees exactly the real keys at or before it (the causal ∧ valid-key mask of every other
path) whatever the layout of the row (left-padded prompt ++ right-padded response, or any
other): no rotation and no contiguity check, unlike the cuDNN path. A padding query sees
the padding keys at or before it (at least itself, so no empty softmax row); its output
differs from the full masked softmax's (the uniform mean over all slots) but, as with cuDNN,
nothing downstream reads it: real queries never attend padding.

The kernel runs per device: under a mesh (`mesh.current_mesh`, set while the train step,
the log-prob passes and the sampler's prefill are traced) it is wrapped in a `shard_map`
over the batch (data × fsdp) and, where q heads and kv heads both divide the tensor axis,
over heads. Off TPU it runs in Pallas' interpret mode (exact, slow: for tests only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flowrl_jax.errors import ConfigError
from flowrl_jax.mesh import current_mesh, current_platform, logical_to_spec

Array = jax.Array

#: sequence tiles the kernel may use, largest first (q and kv blocks; a multiple of 128,
#: the TPU lane width, which the kernel requires with segment ids)
SPLASH_BLOCKS = (512, 256, 128)
#: sequences are padded to a multiple of this (padding slots get segment id 0)
LANES = 128


def segment_ids(k_valid: Array, length: int) -> Array:
    """[B, length] int32 segment ids: 1 on real tokens, 0 on padding (including the slots
    past k_valid's T, which pad the sequence to the kernel's tile)."""
    seg = k_valid.astype(jnp.int32)
    return jnp.pad(seg, ((0, 0), (0, length - seg.shape[1])))


def padded_length(t: int) -> int:
    """T rounded up to the kernel's lane multiple."""
    return -(-t // LANES) * LANES


def block_size(t: int) -> int:
    """The largest of SPLASH_BLOCKS dividing `t` (a multiple of LANES)."""
    return next(b for b in SPLASH_BLOCKS if t % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, t: int, interpret: bool) -> Any:
    """The splash kernel for `heads` query heads over T = `t` slots (causal; the segment ids
    come per call), forward and backward blocks of `block_size(t)`."""
    # the TPU kernel's module (≈ 1 s to import) is only needed by programs that use it
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = block_size(t)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
    # the kernel holds its block tables as arrays: concrete ones, though built while a
    # program is traced (a tracer would leak out of the cache)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _per_device(q: Array, k: Array, v: Array, k_valid: Array, interpret: bool) -> Array:
    """Splash attention of one device's rows and heads: q [B,T,N,D], k/v [B,T,KV,D],
    k_valid [B,T] → [B,T,N,D] in q's dtype."""
    # the TPU kernel's module: see _kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, n, d = q.shape
    tp = padded_length(t)
    dt = q.dtype
    pad = ((0, 0), (0, 0), (0, tp - t), (0, 0))
    # heads-major [B, heads, T, D]; the kernel does not scale the scores
    qh = jnp.pad((q.astype(jnp.float32) * d ** -0.5).astype(dt).transpose(0, 2, 1, 3), pad)
    kh = jnp.pad(k.astype(dt).transpose(0, 2, 1, 3), pad)
    vh = jnp.pad(v.astype(dt).transpose(0, 2, 1, 3), pad)
    seg = segment_ids(k_valid, tp)
    kernel = _kernel(n, tp, interpret)

    def one(qr, kr, vr, sr):
        return kernel(qr, kr, vr, segment_ids=SegmentIds(sr, sr))

    out = jax.vmap(one)(qh, kh, vh, seg)  # [B, N, Tp, D]
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(dt)


def splash_attention(q: Array, k: Array, v: Array, k_valid: Array) -> Array:
    """Causal self-attention without a cache through the splash kernel: q [B,T,N,D], k/v
    [B,T,KV,D] (GQA: N a multiple of KV), k_valid [B,T] bool → [B,T,N,D]. Rows equal the
    causal ∧ valid-key softmax on real queries (see the module docstring for padding)."""
    interpret = current_platform() != "tpu"
    precision = str(jax.config.jax_default_matmul_precision or "").lower()
    if not interpret and jnp.dtype(q.dtype).itemsize < 4 and precision in ("highest", "float32"):
        # Mosaic rejects fp32-pass products of 16-bit operands ("Bad lhs type")
        raise ConfigError(f"model.attention splash: 16-bit attention on TPU needs the default "
                          f"matmul precision, not jax_default_matmul_precision={precision!r}; "
                          f"unset it or set model.attention=plain")
    mesh = current_mesh()
    if mesh is None or mesh.devices.size == 1:
        return _per_device(q, k, v, k_valid, interpret)
    q_spec = logical_to_spec(("batch", None, "heads", None), mesh, q.shape)
    k_spec = logical_to_spec(("batch", None, "kv_heads", None), mesh, k.shape)
    if q_spec[2] != k_spec[2]:  # a shard must hold whole GQA groups: heads stay whole
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        k_spec = PartitionSpec(k_spec[0], None, None, None)
    valid_spec = PartitionSpec(q_spec[0], None)
    fn = functools.partial(_per_device, interpret=interpret)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, valid_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, k_valid)
