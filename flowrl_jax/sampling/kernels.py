"""The sampler's compiled device functions (`Kernels`): prefill, insert, admit (prefill +
insert) and a decode chunk, over a decode state of fixed slots.

Public interface, used by the engine (engine.py) and the JetStream adapter (jetstream.py):
the traceable methods `prefill`, `insert`, `admit`, `decode_chunk` (to call inside a caller's
own jit) and their compiled forms `prefill_jit`, `insert_jit`, `admit_jit`,
`decode_chunk_jit`; `init_state`; and `bucket`, the static shape of a length.

Admission. Prefill computes the cache of `prompt[:-1]` (length bucketed to a static size) and
scatters it into every slot that runs a sample of that prompt: G samples share one prefill.
The last prompt token is fed by the first decode step, so the first generated token is sampled
by the same code (and the same per-sample key schedule, random.py) as every other token.

Decode. `decode_chunk` runs up to `chunk` steps in a `lax.while_loop` on device (leaving early
when every slot is idle); between chunks the host reads the emitted tokens, frees finished
slots and admits waiting requests (continuous batching, engine.py).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flowrl_jax.config import ModelArch
from flowrl_jax.mesh import batch_sharding, compute_platform, named_sharding
from flowrl_jax.models.decode import (CACHE_AXES, DecodeCache, DecodeMatrices, cache_shape,
                                      decode_forward, empty_cache, prefill, rope_table)
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling import cpu_fast_paths
from flowrl_jax.sampling.logits import sample_logits
from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.sampling.random import key_width, sample_keys, step_keys
from flowrl_jax.sampling.results import FINISH_LENGTH, FINISH_NONE, FINISH_STOP

Array = jax.Array


class DecodeState(NamedTuple):
    """Everything the decode loop carries, per slot; `pos` is both cache slot and RoPE position."""

    cache: list[DecodeCache]  # per layer, S slots
    token: Array  # [slots] int32 token fed at the next step
    pos: Array  # [slots] int32 its cache slot / position
    active: Array  # [slots] bool
    generated: Array  # [slots] int32 tokens generated so far
    budget: Array  # [slots] int32 max new tokens
    keys: Array  # [slots, key_width()] uint32 per-sample base key


class ChunkOut(NamedTuple):
    """Per-step outputs of a decode chunk, [chunk, slots] each."""

    tokens: Array
    logprobs: Array
    emitted: Array  # bool: the slot produced a token at this step
    finish: Array  # int32: FINISH_* for the step that ended the sample


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of the largest."""
    for b in sorted(buckets):
        if b >= n:
            return b
    top = max(buckets)
    return int(math.ceil(n / top) * top)


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n - 1).bit_length())


def finish_reasons(act: Array, tok: Array, gen: Array, budget: Array, pos: Array, length: int,
                   stop_ids: Array) -> Array:
    """[slots] int32 after a step that sampled `tok` at `pos` (the `gen`-th token): FINISH_STOP
    on a stop id (`stop_ids` padded with -1), FINISH_LENGTH at the budget or the cache's end,
    else FINISH_NONE; slots not stepping (`act` false) never finish."""
    stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    at_length = (gen >= budget) | (pos + 1 >= length)
    return jnp.where(act & stop, FINISH_STOP, jnp.where(act & at_length, FINISH_LENGTH, FINISH_NONE))


class KernelsBase:
    """What the dense and paged kernels share: the jitted forms of the traced functions, the
    prefill (dense decode layout in both) and admission (prefill, then the subclass's insert).
    Subclasses define `insert`, `decode_chunk`, `state_shardings`, `init_state` and friends."""

    def __init__(self, graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any):
        self.graphdef, self.arch, self.mesh = graphdef, arch, mesh
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.admit_jit = jax.jit(self.admit, donate_argnums=(1,))
        self.prefill_jit = jax.jit(self.prefill)
        self.insert_jit = jax.jit(self.insert, donate_argnums=(0,))
        self.decode_chunk_jit = jax.jit(self.decode_chunk, static_argnums=(3, 4),
                                        donate_argnums=(1,))
        self._init_fns: dict[tuple, Any] = {}

    @property
    def device(self) -> jax.Device:
        """The (first) device the kernels run on."""
        return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

    def prefill(self, params: Any, tokens: Array, lengths: Array) -> list[DecodeCache]:
        """Decode-layout cache (P slots) of right-padded prompts `tokens` [B, P] with
        `lengths` [B] (models/decode.py `prefill`)."""
        with compute_platform(self.mesh):  # code paths for the mesh's devices
            return prefill(nnx.merge(self.graphdef, params), tokens, lengths, self.cache_dtype)

    def prefill_sealed(self, params: Any, tokens: Array, lengths: Array) -> list[DecodeCache]:
        """`prefill` as a computation of its own inside the caller's program (a conditional
        branch, always taken), so that XLA cannot fuse its last ops (RoPE, the transpose to
        the decode layout) into the insert that consumes it. Fused into the dense or the
        paged insert, the same prefill rounded differently (keys from layer 1 on differed in
        the last bit on CPU), and the two engines' log-probs with it; an optimization
        barrier does not stop it (XLA:CPU drops barriers before fusing)."""
        def run():
            return self.prefill(params, tokens, lengths)

        def skip():  # never taken (a prompt length is never negative); the same shapes
            zeros = jnp.zeros(cache_shape(self.arch, *tokens.shape), self.cache_dtype)
            return [DecodeCache(zeros, zeros) for _ in range(self.arch.num_hidden_layers)]

        return jax.lax.cond(jnp.min(lengths) >= 0, run, skip)

    def admit(self, params: Any, st: Any, tokens: Array, lengths: Array, src: Array,
              dst: Array, last_token: Array, budget: Array, seed: Array, prompt_index: Array,
              sample_index: Array) -> Any:
        """Prefill a batch of prompts once and insert each into its slots (G copies)."""
        prefix = self.prefill_sealed(params, tokens, lengths)
        keys = sample_keys(seed, prompt_index, sample_index)
        return self.insert(st, prefix, src, dst, last_token, lengths[src], budget, keys)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs `shapes` carrying `shardings` (a matching tree; None: as they are)."""
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


class Kernels(KernelsBase):
    """The device functions for one (model graph, mesh, cache dtype).

    Shared per key (`kernels_for`), so every engine over the same architecture shares
    compilations (the trainer's engine, eval engines, tests). Only array shapes and the
    `SamplingSpec` trigger recompiles.
    """

    # ----------------------------------------------------------------- shardings

    def state_shardings(self, slots: int, length: int) -> Optional[DecodeState]:
        """NamedShardings of a decode state (None without a mesh)."""
        if self.mesh is None:
            return None
        cs = named_sharding(self.mesh, CACHE_AXES, self.cache_shape(slots, length))
        b1 = batch_sharding(self.mesh, 1, (slots,))
        b2 = batch_sharding(self.mesh, 2, (slots, key_width()))
        return DecodeState([DecodeCache(cs, cs) for _ in range(self.arch.num_hidden_layers)],
                           b1, b1, b1, b1, b1, b2)

    def cache_shape(self, slots: int, length: int) -> tuple[int, int, int, int]:
        """Keys and values: [slots, kv_heads, head_dim, length]."""
        return cache_shape(self.arch, slots, length)

    def constrain(self, st: DecodeState) -> DecodeState:
        """`st` constrained to its shardings (as it is without a mesh). Traced."""
        sh = self.state_shardings(st.token.shape[0], st.cache[0].length)
        return st if sh is None else jax.lax.with_sharding_constraint(st, sh)

    def init_state(self, slots: int, length: int) -> DecodeState:
        """An empty decode state (all slots idle) placed in its shardings."""
        key = (slots, length)
        if key not in self._init_fns:  # one compiled initialiser per shape, not one per call
            self._init_fns[key] = jax.jit(lambda: self._empty_state(slots, length),
                                          out_shardings=self.state_shardings(slots, length))
        return self._init_fns[key]()

    def abstract_state(self, slots: int, length: int) -> DecodeState:
        """`init_state`'s result as ShapeDtypeStructs with their shardings (nothing allocated;
        for lowering the kernels ahead of time)."""
        return with_shardings(jax.eval_shape(lambda: self._empty_state(slots, length)),
                              self.state_shardings(slots, length))

    def _empty_state(self, slots: int, length: int) -> DecodeState:
        cache = empty_cache(self.arch, slots, length, self.cache_dtype)
        zi = jnp.zeros((slots,), jnp.int32)
        return DecodeState(cache, zi, zi, jnp.zeros((slots,), bool), zi, zi,
                           jnp.zeros((slots, key_width()), jnp.uint32))

    # ----------------------------------------------------------------- traced functions

    def insert(self, st: DecodeState, prefix: list[DecodeCache], src: Array, dst: Array,
               last_token: Array, pos: Array, budget: Array, keys: Array) -> DecodeState:
        """Copy prefix rows `src` [M] into slots `dst` [M] (out-of-range dst = no-op) and start
        them: next token `last_token`, at position `pos`, `budget` new tokens, base `keys`."""
        p = prefix[0].length
        cache = []
        for c, pc in zip(st.cache, prefix):
            k = c.k.at[dst, :, :, :p].set(pc.k[src].astype(c.k.dtype), mode="drop")
            v = c.v.at[dst, :, :, :p].set(pc.v[src].astype(c.v.dtype), mode="drop")
            cache.append(DecodeCache(k, v))

        def put(a, x):
            return a.at[dst].set(x.astype(a.dtype), mode="drop")

        st = DecodeState(cache, put(st.token, last_token), put(st.pos, pos),
                         put(st.active, jnp.ones_like(dst, bool)), put(st.generated, jnp.zeros_like(dst)),
                         put(st.budget, budget), put(st.keys, keys))
        return self.constrain(st)

    def _step(self, model: Qwen2ForCausalLM, st: DecodeState, stop_ids: Array,
              spec: SamplingSpec, length: int, rope: tuple[Array, Array],
              mats: Optional[DecodeMatrices], products: str, noise: Optional[Array] = None):
        """One decode step over the whole cache (`length` positions). `noise`: this step's
        rows of the chunk's pre-drawn noise, if the chunk made it."""
        pos = jnp.minimum(st.pos, length - 1)
        logits, new_cache = decode_forward(model, st.token, pos, st.cache, rope, mats, products)
        logits = logits.astype(jnp.float32)
        keys = None if noise is not None else step_keys(st.keys, st.generated)
        tok, logp = sample_logits(logits, keys, spec, noise)
        gen = st.generated + 1
        act = st.active
        finish = finish_reasons(act, tok, gen, st.budget, pos, length, stop_ids)
        new = DecodeState(new_cache, jnp.where(act, tok, st.token), st.pos + act.astype(jnp.int32),
                          act & (finish == FINISH_NONE), jnp.where(act, gen, st.generated),
                          st.budget, st.keys)
        return self.constrain(new), (tok, logp, act, finish.astype(jnp.int32))

    def decode_chunk(self, params: Any, st: DecodeState, stop_ids: Array, spec: SamplingSpec,
                     chunk: int) -> tuple[DecodeState, ChunkOut]:
        """Up to `chunk` decode steps on device; stops early when every slot is idle.

        Attention reads each slot's whole cache row (positions past a slot's own are
        masked): no windows of the cache, so the reductions run over the same length as the
        paged engine's gathered pages (engine.py `cache_length`), the same numbers bit for
        bit, and one decode loop compiles per shape."""
        model = nnx.merge(self.graphdef, params)
        slots, length = st.token.shape[0], st.cache[0].length
        rope = rope_table(self.arch, length)
        mats, noise, products = None, None, "matmul"
        if cpu_fast_paths.enabled(self.device):
            products = "elementwise"
            model = cpu_fast_paths.per_layer_weights(model)
            mats = cpu_fast_paths.decode_matrices(model, slots, chunk)
            noise = cpu_fast_paths.chunk_noise(st.keys, st.generated, spec, chunk,
                                               self.arch.vocab_size)
        outs = ChunkOut(jnp.zeros((chunk, slots), jnp.int32), jnp.zeros((chunk, slots), jnp.float32),
                        jnp.zeros((chunk, slots), bool), jnp.zeros((chunk, slots), jnp.int32))

        def cond(c):
            i, s, _ = c
            return (i < chunk) & jnp.any(s.active)

        def body(c):
            i, s, outs = c
            s, row = self._step(model, s, stop_ids, spec, length, rope, mats, products,
                                None if noise is None else noise[i])
            return i + 1, s, ChunkOut(*[o.at[i].set(r) for o, r in zip(outs, row)])

        _, st, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), st, outs))
        return st, outs


_KERNELS: dict[tuple, Kernels] = {}


def kernels_for(graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any) -> Kernels:
    """The shared `Kernels` of a model graph on a mesh."""
    key = (graphdef, arch, mesh, jnp.dtype(cache_dtype).name)
    if key not in _KERNELS:
        _KERNELS[key] = Kernels(graphdef, arch, mesh, cache_dtype)
    return _KERNELS[key]
