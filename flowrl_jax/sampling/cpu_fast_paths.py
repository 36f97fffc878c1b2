"""The sampler's CPU-only fast paths, behind one switch (`enabled`) with their limits in one
place (`CpuFastPaths`, the instance `LIMITS`).

On GPU/TPU the decode path is the plain one: matmul attention, the model's own weight
layout, the Gumbel noise drawn per step, one decode loop. On a CPU device XLA:CPU's
code for decode shapes rewards four changes, each exact (same tokens and log-probs):
- elementwise decode attention products (models/decode.py `decode_attention`);
- [in, out] copies of the matmul weights per decode chunk (`decode_matrices`);
- the Gumbel noise of a whole chunk drawn before its loop (`chunk_noise`);
- parallel decode groups in threads, one per core (`decode_groups`, `group_pool`);
- a scanned model's layers as per-layer arrays per decode chunk (`per_layer_weights`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

from flowrl_jax.models.decode import DecodeMatrices, transposed_weights
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM, matmul_params, with_layer_form
from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.sampling.random import fast_threefry, gumbel_noise, step_keys

Array = jax.Array


@dataclass(frozen=True)
class CpuFastPaths:
    """When each CPU fast path pays (measured on a 2-core VM with a 32 MiB L3)."""

    #: decode chunks multiply by [in, out] copies of the weights when all matmul weights
    #: together take at most this many bytes (in compute dtype): a transient copy per chunk
    #: (Qwen2.5-0.5B in float32: 2 GB)...
    transpose_max_bytes: int = 4 << 30
    #: ...and only for chunks of at least this many slots: a one-row step is a matrix-vector
    #: product, as fast in either layout, so the copy is pure cost (0.5B, 64 tokens: batch 1
    #: 4.4 → 5.3 s with it, batch 4 10.5 → 7.8 s, batch 32 23.7 → 21.0 s)...
    transpose_min_slots: int = 4
    #: ...and steps: the 0.5B copy costs ≈ 0.9 s, the steps gain ≈ 55 ms each at batch 32
    transpose_min_steps: int = 16
    #: a decode chunk draws the Gumbel noise of all its steps at once, before the loop, when
    #: that takes at most this many bytes (chunk × slots × vocabulary × 4): a small
    #: vocabulary's hash runs ~3× faster in one big fusion than per step (tiny model,
    #: 16 slots × 64 steps: generate 9.8 → 8.7 ms). At a real vocabulary (152k) it would be
    #: gigabytes, and the per-step hash is then a small part of a step.
    noise_max_bytes: int = 8 << 20
    #: models whose matmul weights fit this many bytes decode in parallel groups, one per
    #: core: XLA:CPU runs such a model's small dots on one core, so a second loop over half
    #: the slots doubles the cores in use. Above it the dots already use every core and each
    #: group re-reads weights that no longer fit the cache (2 groups vs one loop, 32 samples ×
    #: 64 tokens: 0.3 MiB of weights 1.3-1.6×, 2.4 MiB 1.66×, 19 MiB 1.16×, 74 MiB 0.87×,
    #: Qwen2.5-0.5B 0.8×)...
    groups_max_weight_bytes: int = 32 << 20
    #: ...each group keeps at least this many slots (fewer rows per step waste a group's
    #: loop; tiny model, 8 samples in 2 groups of 4: 5.8 → 4.7 ms, 4 in 2 groups of 2: 4.0 → 6.1)...
    group_min_slots: int = 4
    #: ...and calls run at least this many new tokens (a thread start is ~0.1 ms)
    group_min_steps: int = 16


#: the limits in force (tests replace it with `dataclasses.replace(LIMITS, ...)`)
LIMITS = CpuFastPaths()


def enabled(device: jax.Device) -> bool:
    """The switch: whether a sampler running on `device` takes the CPU fast paths."""
    return device.platform == "cpu"


def matmul_weight_bytes(model: Qwen2ForCausalLM) -> int:
    """Bytes of every matmul weight (linear layers + LM head) in the compute dtype: what a
    decode step reads."""
    return matmul_params(model.arch) * jnp.dtype(model.num.compute_dtype).itemsize


def per_layer_weights(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The model with its layers unrolled: for a scanned model (qwen2.DecoderStack), each
    layer's slices of the stacked weights made once per decode chunk, before its step loop.
    XLA:CPU otherwise copies every slice at every step before its dot (measured: a
    2-slot greedy decode of a 4-layer, 256-wide model 0.25 → 0.49 s). Traced."""
    return with_layer_form(model, False)


def decode_matrices(model: Qwen2ForCausalLM, slots: int, steps: int) -> Optional[DecodeMatrices]:
    """[in, out] weight copies for a CPU decode chunk of `slots` rows and up to `steps`
    steps within `LIMITS`, else None (the model's own layout). Traced."""
    if (slots < LIMITS.transpose_min_slots or steps < LIMITS.transpose_min_steps
            or matmul_weight_bytes(model) > LIMITS.transpose_max_bytes):
        return None
    return transposed_weights(model)


def chunk_noise(keys: Array, generated: Array, spec: SamplingSpec, chunk: int,
                vocab: int) -> Optional[Array]:
    """[chunk, slots, vocab] Gumbel noise of every step of a decode chunk over slots with base
    keys `keys` [slots, 2] that have generated `generated` [slots] tokens, or None (greedy,
    over `LIMITS.noise_max_bytes`, or a non-default PRNG). Traced.

    Step i of a slot that is active then has generated `generated + i` tokens (slots are
    admitted only between chunks), so its noise is the one the step would draw itself; rows
    of idle slots are never read."""
    slots = generated.shape[0]
    if (spec.temperature == 0.0 or not fast_threefry()
            or chunk * slots * vocab * 4 > LIMITS.noise_max_bytes):
        return None
    steps = jnp.arange(chunk, dtype=jnp.int32)[:, None]
    step_key = step_keys(jnp.broadcast_to(keys, (chunk,) + keys.shape), generated[None] + steps)
    # the barrier keeps the hash out of the loop (XLA would otherwise sink it into each step)
    return jax.lax.optimization_barrier(gumbel_noise(step_key, vocab))


def host_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode_groups(slots: int, max_new_tokens: int, weight_bytes: int) -> int:
    """Parallel decode groups for a call on one CPU device with `slots` slots: up to one per
    core, each with at least `LIMITS.group_min_slots` slots, for calls of at least
    `LIMITS.group_min_steps` tokens and models within `LIMITS.groups_max_weight_bytes`."""
    if max_new_tokens < LIMITS.group_min_steps or weight_bytes > LIMITS.groups_max_weight_bytes:
        return 1
    return max(1, min(host_cores(), slots // LIMITS.group_min_slots))


_GROUP_POOL: Optional[ThreadPoolExecutor] = None
_GROUP_POOL_LOCK = threading.Lock()


def group_pool() -> ThreadPoolExecutor:
    """The process's threads for decode groups beyond the caller's, one per core at most
    (kept: a thread's first XLA calls are slower than its later ones; threads start on
    demand). More groups than threads only queue: correct, if slower."""
    global _GROUP_POOL
    with _GROUP_POOL_LOCK:
        if _GROUP_POOL is None:
            _GROUP_POOL = ThreadPoolExecutor(host_cores(), thread_name_prefix="flowrl-decode-group")
        return _GROUP_POOL
