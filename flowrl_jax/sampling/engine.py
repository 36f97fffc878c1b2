"""The sampler's host side: `SamplingEngine`, continuous batching over a fixed number of
decode slots on the compiled kernels (kernels.py).

A `generate` call validates lengths and memory, queues its (prompt, sample) work items
prompt-major, and loops: admit waiting items into free slots (one prefill per distinct
prompt, its samples scattered into their slots), run a decode chunk on device, read the
emitted tokens, free finished slots. Samples do not depend on slot assignment (random.py), so
the same seed gives the same rollout at any slot count, chunk size or number of decode groups
(cpu_fast_paths.py: on a CPU device small models split their slots over threaded groups).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flowrl_jax.config import ModelArch, RolloutConfig
from flowrl_jax.mesh import named_sharding, state_shardings
from flowrl_jax.models.decode import CACHE_AXES, cache_bytes
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling import cpu_fast_paths
from flowrl_jax.sampling.kernels import DecodeState, bucket, kernels_for, pow2
from flowrl_jax.sampling.params import SamplingError, SamplingParams, SamplingSpec
from flowrl_jax.sampling.results import FINISH_NAMES, FINISH_NONE, Rollout

# the sampler's request and result types, importable from here as before
__all__ = ["Rollout", "SamplingEngine", "SamplingError", "SamplingParams", "generate"]


def _device_free_bytes(device: jax.Device) -> Optional[int]:
    """Free memory of a device when the backend reports it (GPU/TPU), else None (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


class _RolloutBuffers:
    """Host arrays a `generate` call fills row by row (row = prompt × n + sample)."""

    def __init__(self, rows: int, max_new_tokens: int):
        # a sample never exceeds max_new_tokens
        self.tokens = np.zeros((rows, max_new_tokens), np.int32)
        self.logprobs = np.zeros((rows, max_new_tokens), np.float32)
        self.lengths = np.zeros((rows,), np.int32)
        self.reasons = [""] * rows


MAX_STOP_IDS = 8  # stop ids travel as a padded array so that changing them never recompiles


class SamplingEngine:
    """Jitted prefill/insert/decode over a slot-based KV cache, driven by a host scheduler.

    Build once per model architecture; call `generate(params, prompts, sampling)` with the
    trainer's current parameters (an nnx.State or a model) each rollout step.
    """

    def __init__(self, model: Qwen2ForCausalLM, *, mesh: Optional[Mesh] = None,
                 decode_slots: int = 256, decode_chunk: int = 64,
                 prefill_buckets: Sequence[int] = (128, 256, 512, 1024, 2048),
                 prefill_batch: int = 8, eos_token_ids: Optional[Sequence[int]] = None,
                 pad_token_id: int = 0, cache_dtype: Any = None, verbose: bool = True):
        self.graphdef = nnx.graphdef(model)
        self.arch: ModelArch = model.arch
        self.weight_bytes = cpu_fast_paths.matmul_weight_bytes(model)
        self.cache_dtype = jnp.dtype(cache_dtype or model.num.compute_dtype)
        self.mesh = mesh
        self.decode_slots = int(decode_slots)
        self.decode_chunk = int(decode_chunk)
        self.prefill_buckets = tuple(sorted(int(b) for b in prefill_buckets))
        self.prefill_batch = int(prefill_batch)
        if eos_token_ids is None:
            eos_token_ids = () if self.arch.eos_token_id is None else (self.arch.eos_token_id,)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.verbose = verbose
        self._printed: set = set()
        if (self.decode_slots <= 0 or self.decode_chunk <= 0 or self.prefill_batch <= 0
                or not self.prefill_buckets):
            raise SamplingError("decode_slots, decode_chunk, prefill_batch must be > 0 and "
                                "prefill_buckets non-empty")
        self.kernels = kernels_for(self.graphdef, self.arch, mesh, self.cache_dtype)

    @classmethod
    def from_rollout_config(cls, model: Qwen2ForCausalLM, cfg: RolloutConfig,
                            mesh: Optional[Mesh] = None, **kw: Any) -> "SamplingEngine":
        """An engine sized by `cfg.rollout` (decode_slots, decode_chunk, prefill_buckets)."""
        return cls(model, mesh=mesh, decode_slots=cfg.decode_slots, decode_chunk=cfg.decode_chunk,
                   prefill_buckets=cfg.prefill_buckets, **kw)

    # ----------------------------------------------------------------- params / memory

    def params_of(self, params: Any) -> Any:
        """The nnx.State to run with: the given arrays as they are, resharded only when they
        live on a different mesh than the engine's."""
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        if self.mesh is None:
            return params
        leaves = jax.tree.leaves(params)
        same = all(isinstance(getattr(x, "sharding", None), NamedSharding)
                   and x.sharding.mesh == self.mesh for x in leaves)
        if same:
            return params
        abstract = nnx.state(nnx.merge(self.graphdef, params))
        return jax.device_put(params, state_shardings(abstract, self.mesh))

    def init_state(self, slots: int, length: int) -> DecodeState:
        """An empty decode state (all slots idle) placed in its shardings."""
        return self.kernels.init_state(slots, length)

    def check_fits(self, prompt_lengths: Sequence[int], max_new_tokens: int, slots: int,
                   length: int) -> int:
        """Validate lengths and memory before any compute; print and return the cache bytes."""
        limit = self.arch.max_position_embeddings
        for i, n in enumerate(prompt_lengths):
            if n <= 0:
                raise SamplingError(f"prompt {i} is empty: every prompt needs at least one token")
            if n + max_new_tokens > limit:
                raise SamplingError(
                    f"prompt {i}: {n} prompt tokens + max_new_tokens {max_new_tokens} = "
                    f"{n + max_new_tokens} exceeds the model's max_position_embeddings {limit}")
            if n - 1 + max_new_tokens > length:  # the last generated token is never cached
                raise SamplingError(f"prompt {i}: {n} + {max_new_tokens} tokens exceed the KV cache "
                                    f"length {length}")
        nbytes = cache_bytes(self.arch, slots, length, self.cache_dtype)
        shards = 1
        if self.mesh is not None:
            spec = named_sharding(self.mesh, CACHE_AXES,
                                  self.kernels.cache_shape(slots, length)).spec
            for axes in spec:
                for a in ((axes,) if isinstance(axes, str) else (axes or ())):
                    shards *= self.mesh.shape[a]
        dev = self.device
        free = _device_free_bytes(dev)
        if free is not None and nbytes / shards > free:
            raise SamplingError(
                f"KV cache needs {nbytes / shards / 2**30:.2f} GiB per device ({slots} slots × "
                f"{length} tokens) but only {free / 2**30:.2f} GiB is free on {dev}; lower "
                "rollout.decode_slots or max_new_tokens")
        key = (slots, length)
        if self.verbose and key not in self._printed:
            self._printed.add(key)
            print(f"[sampler] KV cache: {slots} slots × {length} tokens × "
                  f"{self.arch.num_hidden_layers} layers × 2 × {self.arch.num_key_value_heads} kv "
                  f"heads × {self.arch.resolved_head_dim} × {self.cache_dtype.itemsize} B = "
                  f"{nbytes / 2**20:.1f} MiB", file=sys.stderr)
        return nbytes

    # ----------------------------------------------------------------- host API

    def spec_for(self, sampling: SamplingParams) -> SamplingSpec:
        """The static (compiled) part of `sampling`."""
        return SamplingSpec.of(sampling)

    def stop_ids_for(self, sampling: SamplingParams) -> np.ndarray:
        """Stop ids (EOS unless ignore_eos, plus stop_token_ids) padded with -1."""
        stops = set(int(t) for t in sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops |= set(self.eos_token_ids)
        width = max(MAX_STOP_IDS, pow2(len(stops)))
        out = np.full((width,), -1, np.int32)
        out[:len(stops)] = sorted(stops)
        return out

    def cache_length(self, max_prompt_len: int, max_new_tokens: int) -> int:
        """Cache length: prompt bucket + max_new_tokens rounded up to 32 (fewer shapes)."""
        return (bucket(max(1, max_prompt_len - 1), self.prefill_buckets)
                + int(math.ceil(max_new_tokens / 32) * 32))

    def num_slots(self, n_requests: int) -> int:
        """Slots for a call: enough for every request up to decode_slots, a power of two,
        divisible by the batch shards of the mesh."""
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        slots = min(self.decode_slots, max(pow2(n_requests), shards))
        return int(math.ceil(slots / shards) * shards)

    @property
    def device(self) -> jax.Device:
        """The engine's (first) device."""
        return self.kernels.device

    def decode_groups(self, slots: int, max_new_tokens: int) -> int:
        """How many parallel decode groups a call with `slots` slots runs (1 = one decode
        loop). Only a CPU fast path (cpu_fast_paths.decode_groups) on a single device: a small
        model splits its slots over up to one group per core, run in threads (`generate`)."""
        if self.mesh is not None and self.mesh.devices.size > 1:
            return 1
        if not cpu_fast_paths.enabled(self.device):
            return 1
        return cpu_fast_paths.decode_groups(slots, max_new_tokens, self.weight_bytes)

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> Rollout:
        """Sample `sampling.n` responses for each prompt (token-id lists) with `params`."""
        sampling.validate()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise SamplingError("no prompts given")
        vocab = self.arch.vocab_size
        for i, p in enumerate(prompts):
            if p and (min(p) < 0 or max(p) >= vocab):
                raise SamplingError(f"prompt {i}: token id {max(p) if max(p) >= vocab else min(p)} "
                                    f"is outside the vocabulary [0, {vocab})")
        n_total = len(prompts) * sampling.n
        slots = self.num_slots(n_total)
        length = self.cache_length(max(len(p) for p in prompts), sampling.max_new_tokens)
        self.check_fits([len(p) for p in prompts], sampling.max_new_tokens, slots, length)
        params = self.params_of(params)
        # Work items in prompt-major order; a prompt's samples may be split over admissions
        # (and over decode groups).
        queue = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        out = _RolloutBuffers(n_total, sampling.max_new_tokens)
        groups = min(self.decode_groups(slots, sampling.max_new_tokens), n_total)
        if groups == 1:
            self._decode_items(params, prompts, queue, sampling, slots, length, out)
        else:
            # Contiguous runs of the queue keep most of a prompt's samples in one group (one
            # prefill); each group has its share of the slots, so the caches take the same
            # memory as one loop's. Rows are disjoint, so the groups write `out` concurrently.
            bounds = np.linspace(0, n_total, groups + 1).round().astype(int)
            parts = [queue[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            g_slots = slots // groups
            pool = cpu_fast_paths.group_pool()
            futures = [pool.submit(self._decode_items, params, prompts, part, sampling,
                                   g_slots, length, out) for part in parts[1:]]
            try:
                self._decode_items(params, prompts, parts[0], sampling, g_slots, length, out)
            finally:
                errors = [f.exception() for f in futures]  # waits for every group
            for e in errors:
                if e is not None:
                    raise e
        n_prompts = len(prompts)
        return Rollout(np.repeat(np.arange(n_prompts, dtype=np.int32), sampling.n),
                       np.tile(np.arange(sampling.n, dtype=np.int32), n_prompts),
                       out.tokens, out.logprobs, out.lengths, out.reasons)

    def _decode_items(self, params: Any, prompts: list[list[int]], queue: list[tuple[int, int]],
                      sampling: SamplingParams, slots: int, length: int,
                      out: "_RolloutBuffers") -> None:
        """Run the work items `queue` ((prompt, sample) pairs) to completion on one decode
        state of `slots` slots (continuous batching), writing each into row
        prompt × n + sample of `out`."""
        spec = self.spec_for(sampling)
        stop_ids = self.stop_ids_for(sampling)
        st = self.init_state(slots, length)
        qi = 0
        owner = [-1] * slots  # slot → row in the output
        free = list(range(slots))
        done = 0
        while done < len(queue):
            while free and qi < len(queue):
                take, used = self._next_admission(queue, qi, len(free), prompts)
                qi += len(take)
                st = self._admit_batch(params, st, prompts, take, free[:len(take)], sampling)
                for item, slot in zip(take, free[:len(take)]):
                    owner[slot] = item[0] * sampling.n + item[1]
                free = free[len(take):]
            st, outs = self.kernels.decode_chunk_jit(params, st, stop_ids, spec, self.decode_chunk)
            o_tok, o_lp, o_em, o_fin = (np.asarray(x) for x in jax.device_get(tuple(outs)))
            for slot in np.nonzero(o_em.any(axis=0))[0].tolist():
                row = owner[slot]
                m = o_em[:, slot]
                n0, n1 = int(out.lengths[row]), int(out.lengths[row]) + int(m.sum())
                out.tokens[row, n0:n1] = o_tok[m, slot]
                out.logprobs[row, n0:n1] = o_lp[m, slot]
                out.lengths[row] = n1
                fin = int(o_fin[m, slot][-1])
                if fin != FINISH_NONE:
                    out.reasons[row] = FINISH_NAMES[fin]
                    owner[slot] = -1
                    free.append(slot)
                    done += 1
            free.sort()

    def _next_admission(self, queue: list[tuple[int, int]], qi: int, n_free: int,
                        prompts: list[list[int]]) -> tuple[list[tuple[int, int]], int]:
        """The next work items to admit: at most n_free samples of at most prefill_batch prompts."""
        take: list[tuple[int, int]] = []
        seen: set[int] = set()
        while qi < len(queue) and len(take) < n_free:
            p = queue[qi][0]
            if p not in seen and len(seen) == self.prefill_batch:
                break
            seen.add(p)
            take.append(queue[qi])
            qi += 1
        return take, len(seen)

    def _admit_batch(self, params: Any, st: DecodeState, prompts: list[list[int]],
                     take: list[tuple[int, int]], slots_for: list[int],
                     sampling: SamplingParams) -> DecodeState:
        """Prefill the distinct prompts of `take` once and insert each sample into its slot."""
        slots = st.token.shape[0]
        uniq = sorted({p for p, _ in take})
        row_of = {p: i for i, p in enumerate(uniq)}
        plen = max(len(prompts[p]) - 1 for p in uniq)
        pb = bucket(max(plen, 1), self.prefill_buckets)
        bb = min(self.prefill_batch, pow2(slots))  # one static prefill batch size
        tokens = np.full((bb, pb), self.pad_token_id, np.int32)
        lengths = np.zeros((bb,), np.int32)
        for p in uniq:
            body = prompts[p][:-1]
            tokens[row_of[p], :len(body)] = body
            lengths[row_of[p]] = len(body)
        src = np.zeros((slots,), np.int32)
        dst = np.full((slots,), slots, np.int32)  # out of range → dropped by the scatter
        last = np.zeros((slots,), np.int32)
        pidx = np.zeros((slots,), np.int32)
        sidx = np.zeros((slots,), np.int32)
        for j, ((p, s), slot) in enumerate(zip(take, slots_for)):
            src[j], dst[j], last[j], pidx[j], sidx[j] = row_of[p], slot, prompts[p][-1], p, s
        budget = np.full((slots,), sampling.max_new_tokens, np.int32)
        return self.kernels.admit_jit(params, st, tokens, lengths, src, dst, last, budget,
                                  np.uint32(sampling.seed % 2**32), pidx, sidx)


def generate(engine: SamplingEngine, params: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams) -> Rollout:
    """Functional alias of `engine.generate`."""
    return engine.generate(params, prompts, sampling)
