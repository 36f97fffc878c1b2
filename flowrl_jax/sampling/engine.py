"""The sampler's host side: `SamplingEngine`, continuous batching over a fixed number of
decode slots on the compiled kernels: by default the paged ones (paged_kernels.py: a pool of
KV pages shared by all slots, allocated by the host as samples grow, pages.py), or the dense
reference (kernels.py: a full-length cache row per slot), `kv_cache="paged" | "dense"`.

A `generate` call validates lengths and memory, queues its (prompt, sample) work items
prompt-major, and loops: admit waiting items into free slots (one prefill per distinct
prompt, its samples scattered into their slots), run a decode chunk on device, read the
emitted tokens, free finished slots. Samples do not depend on slot assignment (random.py), so
the same seed gives the same rollout at any slot count, chunk size or number of decode groups
(cpu_fast_paths.py: on a CPU device small models split their slots over threaded groups).
"""

from __future__ import annotations

import functools
import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flowrl_jax.config import ModelArch, RolloutConfig
from flowrl_jax.mesh import named_sharding, state_shardings
from flowrl_jax.models import paged_pallas
from flowrl_jax.models.decode import CACHE_AXES, cache_bytes
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling import cpu_fast_paths
from flowrl_jax.sampling.kernels import DecodeState, Kernels, bucket, kernels_for, pow2
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token, pages_for, pool_pages
from flowrl_jax.sampling.paged_kernels import PagedKernels, PagedState, paged_kernels_for
from flowrl_jax.sampling.pages import PageAllocator
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


@dataclass
class PagedStats:
    """What the last paged `generate` did with its pool (summed over decode groups)."""

    pool_pages: int = 0  # allocatable pages (the null pages not counted)
    peak_pages: int = 0  # most pages in use at once (at chunk starts)
    waits: int = 0  # chunks a running sample sat out for want of pages
    preemptions: int = 0  # samples sent back to the queue to free pages


class _RolloutBuffers:
    """Host arrays a `generate` call fills row by row (row = prompt × n + sample)."""

    def __init__(self, rows: int, max_new_tokens: int):
        # a sample never exceeds max_new_tokens
        self.tokens = np.zeros((rows, max_new_tokens), np.int32)
        self.logprobs = np.zeros((rows, max_new_tokens), np.float32)
        self.lengths = np.zeros((rows,), np.int32)
        self.reasons = [""] * rows


#: KV cache forms (rollout.kv_cache): "paged" (the default), "dense" (the tested reference)
KV_CACHES = ("paged", "dense")
#: paged decode attention implementations (rollout.paged_attention); auto = the Pallas
#: kernels on TPU and GPU, xla elsewhere (models/paged_pallas.py)
PAGED_ATTENTION = paged_pallas.PAGED_ATTENTION
#: without rollout.kv_cache_gib the page pool takes this share of the device's free memory...
KV_FREE_FRACTION = 0.8
#: ...or, on a backend that reports no free memory (CPU), this many bytes
KV_DEFAULT_BYTES = 4 << 30

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
                 pad_token_id: int = 0, cache_dtype: Any = None, verbose: bool = True,
                 kv_cache: str = "paged", page_size: int = 64,
                 kv_cache_gib: Optional[float] = None, paged_attention: str = "auto"):
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
        self._pool_sizes: dict[tuple[int, int], int] = {}
        self._group_stats: list[PagedStats] = []
        self.paged_stats: Optional[PagedStats] = None  # of the last paged generate
        if (self.decode_slots <= 0 or self.decode_chunk <= 0 or self.prefill_batch <= 0
                or not self.prefill_buckets):
            raise SamplingError("decode_slots, decode_chunk, prefill_batch must be > 0 and "
                                "prefill_buckets non-empty")
        if kv_cache not in KV_CACHES:
            raise SamplingError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        if int(page_size) <= 0:
            raise SamplingError(f"page_size must be > 0, got {page_size}")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise SamplingError(f"kv_cache_gib must be > 0 (or None), got {kv_cache_gib}")
        if paged_attention not in PAGED_ATTENTION:
            raise SamplingError(f"paged_attention must be one of {PAGED_ATTENTION}, "
                                f"got {paged_attention!r}")
        self.kv_cache = kv_cache
        self.page_size = int(page_size)
        self.kv_cache_gib = kv_cache_gib
        self.kernels: Union[Kernels, PagedKernels]
        if kv_cache == "paged":
            platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
            try:
                attention = paged_pallas.resolve(paged_attention, platform,
                                                 self.arch.resolved_head_dim, self.page_size)
            except ValueError as e:  # a kernel that does not fit the model or page size
                raise SamplingError(f"rollout.{e}") from e
            self.kernels = paged_kernels_for(self.graphdef, self.arch, mesh, self.cache_dtype,
                                             self.page_size, attention)
        else:
            self.kernels = kernels_for(self.graphdef, self.arch, mesh, self.cache_dtype)

    @classmethod
    def from_rollout_config(cls, model: Qwen2ForCausalLM, cfg: RolloutConfig,
                            mesh: Optional[Mesh] = None, **kw: Any) -> "SamplingEngine":
        """An engine sized by `cfg.rollout` (decode_slots, decode_chunk, prefill_buckets, and
        the KV cache: kv_cache, page_size, kv_cache_gib, paged_attention)."""
        return cls(model, mesh=mesh, decode_slots=cfg.decode_slots, decode_chunk=cfg.decode_chunk,
                   prefill_buckets=cfg.prefill_buckets, kv_cache=cfg.kv_cache,
                   page_size=cfg.page_size, kv_cache_gib=cfg.kv_cache_gib,
                   paged_attention=cfg.paged_attention, **kw)

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

    def init_state(self, slots: int, length: int) -> Union[DecodeState, PagedState]:
        """An empty decode state (all slots idle) placed in its shardings; paged: static page
        tables (each slot owns the pages of `length` positions, as a dense cache row)."""
        return self.kernels.init_state(slots, length)

    def _shards(self, axes: tuple, shape: tuple) -> int:
        """Devices one array of logical `axes` and `shape` is split over on the engine's mesh."""
        if self.mesh is None:
            return 1
        shards = 1
        for names in named_sharding(self.mesh, axes, shape).spec:
            for a in ((names,) if isinstance(names, str) else (names or ())):
                shards *= self.mesh.shape[a]
        return shards

    def pool_shards(self, slots: int) -> int:
        """Blocks the paged pool is split into for `slots` slots: one per slot shard of the
        mesh, each with its own null page and allocator (1 without a mesh)."""
        return self.kernels.shards(slots) if self.kv_cache == "paged" else 1

    def pool_pages(self, slots: int, length: int, free_bytes: Optional[int] = None) -> int:
        """Pages of the paged pool (all shards, null pages included) for calls of `slots`
        slots over `length` positions: what `kv_cache_gib` (the whole pool, so each slot
        shard's chips hold 1/shards of it; else KV_FREE_FRACTION of a chip's free memory,
        `free_bytes` or the device's, else KV_DEFAULT_BYTES) buys, at most what every slot's
        full length needs (+ each shard's null page), a whole number of pages per shard.
        Decided once per shape, so later calls reuse the compiled programs."""
        key = (slots, length, free_bytes)
        if key not in self._pool_sizes:
            shards = self.pool_shards(slots)
            full = slots // shards * pages_for(length, self.page_size) + 1  # per shard
            if self.kv_cache_gib is not None:
                budget = int(self.kv_cache_gib * 2**30)
            else:
                free = _device_free_bytes(self.device) if free_bytes is None else free_bytes
                split = self.kernels.pool_split(slots, shards * full)
                budget = KV_DEFAULT_BYTES if free is None else int(KV_FREE_FRACTION * free * split)
            per_shard = pool_pages(budget, self.arch, self.cache_dtype, self.page_size) // shards
            self._pool_sizes[key] = shards * max(2, min(full, per_shard))
        return self._pool_sizes[key]

    def check_fits(self, prompt_lengths: Sequence[int], max_new_tokens: int, slots: int,
                   length: int, num_pages: Optional[int] = None) -> int:
        """Validate lengths and memory before any compute; print and return the cache bytes
        (paged: a pool of `num_pages` pages, or the static pool of `init_state`)."""
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
        if self.kv_cache == "paged":
            n_shards = self.pool_shards(slots)
            pages = num_pages if num_pages is not None else n_shards * (
                slots // n_shards * pages_for(length, self.page_size) + 1)
            nbytes = pages * self.page_size * kv_bytes_per_token(self.arch, self.cache_dtype)
            shards = self.kernels.pool_split(slots, pages)
            what = f"{pages} pages × {self.page_size} tokens" + (
                f" in {n_shards} slot shards" if n_shards > 1 else "")
            hint = "set rollout.kv_cache_gib lower"
        else:
            nbytes = cache_bytes(self.arch, slots, length, self.cache_dtype)
            shards = self._shards(CACHE_AXES, self.kernels.cache_shape(slots, length))
            what = f"{slots} slots × {length} tokens"
            hint = "lower rollout.decode_slots or max_new_tokens"
        dev = self.device
        free = _device_free_bytes(dev)
        if free is not None and nbytes / shards > free:
            raise SamplingError(
                f"KV cache needs {nbytes / shards / 2**30:.2f} GiB per device ({what}) but only "
                f"{free / 2**30:.2f} GiB is free on {dev}; {hint}")
        key = (slots, length, num_pages)
        if self.verbose and key not in self._printed:
            self._printed.add(key)
            print(f"[sampler] KV cache ({self.kv_cache}): {what} × "
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
        """Cache length: prompt bucket + max_new_tokens rounded up to 32 (fewer shapes), then
        to whole pages of `page_size`, in both engines: a dense row then has exactly the
        length of a paged slot's gathered pages, so both attend over arrays of one shape and
        round alike (bit-identical log-probs; a reduction over another length need not)."""
        n = (bucket(max(1, max_prompt_len - 1), self.prefill_buckets)
             + int(math.ceil(max_new_tokens / 32) * 32))
        return pages_for(n, self.page_size) * self.page_size

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

    def checked_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The prompts as int lists; none, or a token id outside the vocabulary, is an error."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise SamplingError("no prompts given")
        vocab = self.arch.vocab_size
        for i, p in enumerate(prompts):
            if p and (min(p) < 0 or max(p) >= vocab):
                raise SamplingError(f"prompt {i}: token id {max(p) if max(p) >= vocab else min(p)} "
                                    f"is outside the vocabulary [0, {vocab})")
        return prompts

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams, *,
                 prompt_indices: Optional[Sequence[int]] = None) -> Rollout:
        """Sample `sampling.n` responses for each prompt (token-id lists) with `params`.

        `prompt_indices` are the prompts' indices in their sample keys (default 0, 1, …): a
        part of a batch sampled elsewhere (a rollout server) gets the samples the whole batch
        would get here."""
        sampling.validate()
        prompts = self.checked_prompts(prompts)
        keys = np.arange(len(prompts), dtype=np.int32)
        if prompt_indices is not None:
            keys = np.asarray(prompt_indices, np.int64)
            if keys.shape != (len(prompts),) or (keys < 0).any() or (keys >= 2**31).any():
                raise SamplingError(f"prompt_indices: expected {len(prompts)} indices in "
                                    f"[0, 2**31), got {list(prompt_indices)[:8]}")
            keys = keys.astype(np.int32)
        n_total = len(prompts) * sampling.n
        slots = self.num_slots(n_total)
        length = self.cache_length(max(len(p) for p in prompts), sampling.max_new_tokens)
        groups = min(self.decode_groups(slots, sampling.max_new_tokens), n_total)
        num_pages = None
        if self.kv_cache == "paged":
            num_pages = self.pool_pages(slots, length)
            need = max(pages_for(len(p) - 1 + sampling.max_new_tokens, self.page_size)
                       for p in prompts)
            # a sample runs on one shard: the longest must fit one shard's block
            self._check_pool_fits(need, num_pages // self.pool_shards(slots) - 1, prompts,
                                  sampling, self.pool_shards(slots))
            while groups > 1 and (num_pages - 1) // groups < need:
                groups -= 1  # each group's pool must hold the longest sample
        self.check_fits([len(p) for p in prompts], sampling.max_new_tokens, slots, length,
                        num_pages)
        params = self.params_of(params)
        # Work items in prompt-major order; a prompt's samples may be split over admissions
        # (and over decode groups).
        queue = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        out = _RolloutBuffers(n_total, sampling.max_new_tokens)
        self._group_stats = []
        decode = self._decode_items
        if num_pages is not None:  # paged: each group its share of the pool (+ a null page)
            decode = functools.partial(self._decode_items_paged,
                                       num_pages=(num_pages - 1) // groups + 1)
        if groups == 1:
            decode(params, prompts, queue, sampling, slots, length, out, keys)
        else:
            # Contiguous runs of the queue keep most of a prompt's samples in one group (one
            # prefill); each group has its share of the slots, so the caches take the same
            # memory as one loop's. Rows are disjoint, so the groups write `out` concurrently.
            bounds = np.linspace(0, n_total, groups + 1).round().astype(int)
            parts = [queue[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            g_slots = slots // groups
            pool = cpu_fast_paths.group_pool()
            futures = [pool.submit(decode, params, prompts, part, sampling,
                                   g_slots, length, out, keys) for part in parts[1:]]
            try:
                decode(params, prompts, parts[0], sampling, g_slots, length, out, keys)
            finally:
                errors = [f.exception() for f in futures]  # waits for every group
            for e in errors:
                if e is not None:
                    raise e
        if num_pages is not None:
            parts = self._group_stats
            self.paged_stats = PagedStats(sum(p.pool_pages for p in parts),
                                          sum(p.peak_pages for p in parts),
                                          sum(p.waits for p in parts),
                                          sum(p.preemptions for p in parts))
        n_prompts = len(prompts)
        return Rollout(np.repeat(np.arange(n_prompts, dtype=np.int32), sampling.n),
                       np.tile(np.arange(sampling.n, dtype=np.int32), n_prompts),
                       out.tokens, out.logprobs, out.lengths, out.reasons)

    def _decode_items(self, params: Any, prompts: list[list[int]], queue: list[tuple[int, int]],
                      sampling: SamplingParams, slots: int, length: int,
                      out: "_RolloutBuffers", keys: np.ndarray) -> None:
        """Run the work items `queue` ((prompt, sample) pairs) to completion on one decode
        state of `slots` slots (continuous batching), writing each into row
        prompt × n + sample of `out`; `keys`: each prompt's index in its sample keys."""
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
                st = self._admit_batch(params, st, prompts, take, free[:len(take)], sampling,
                                       keys)
                for item, slot in zip(take, free[:len(take)]):
                    owner[slot] = item[0] * sampling.n + item[1]
                free = free[len(take):]
            st, outs = self.kernels.decode_chunk_jit(params, st, stop_ids, spec, self.decode_chunk)
            for slot, _, finished in _collect(outs, owner, out):
                if finished:
                    owner[slot] = -1
                    free.append(slot)
                    done += 1
            free.sort()

    def _check_pool_fits(self, need: int, capacity: int, prompts: list[list[int]],
                         sampling: SamplingParams, shards: int = 1) -> None:
        """A SamplingError naming the budget when one sample alone needs more pages than the
        pool holds (it could never run)."""
        if need <= capacity:
            return
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        budget = (f"rollout.kv_cache_gib {self.kv_cache_gib}" if self.kv_cache_gib is not None
                  else "the default KV budget")
        where = f" per slot shard (the pool is split {shards} ways)" if shards > 1 else ""
        raise SamplingError(
            f"KV page pool too small: {budget} buys {capacity} pages of {self.page_size} tokens"
            f"{where}, "
            f"but prompt {longest} ({len(prompts[longest])} tokens) + max_new_tokens "
            f"{sampling.max_new_tokens} needs {need} pages; raise rollout.kv_cache_gib or "
            "lower max_new_tokens")

    def _decode_items_paged(self, params: Any, prompts: list[list[int]],
                            queue: list[tuple[int, int]], sampling: SamplingParams, slots: int,
                            length: int, out: "_RolloutBuffers", keys: np.ndarray, *,
                            num_pages: int) -> None:
        """`_decode_items` on a page pool of `num_pages` pages (paged_kernels.py).

        On a mesh the pool and the slots are split into shards (`pool_shards`): each shard
        has its own allocator, and a slot gets pages of its own shard only. Between chunks
        the host gives every running sample, oldest first, the pages its next chunk writes
        (all of them or none: a sample without them waits, keeping its slot and pages). New
        samples are admitted (FIFO) into a shard only when every sample running there got
        its pages, while a slot and the pages of their prompt + first chunk are free there;
        the samples of a prompt admitted together go to one shard (the one with room for
        most of them) and share its full pages. When no running sample of a shard can get
        its pages, the shard's youngest is preempted (pages returned, requeued at the front,
        its tokens dropped: it restarts from its prompt with the same keys) until one can;
        one sample alone always fits a shard (`_check_pool_fits`), so this never deadlocks."""
        kern: PagedKernels = self.kernels  # type: ignore[assignment]
        spec = self.spec_for(sampling)
        stop_ids = self.stop_ids_for(sampling)
        p_size, chunk, max_new = self.page_size, self.decode_chunk, sampling.max_new_tokens
        st = kern.init_state(slots, length, num_pages)
        shards = self.pool_shards(slots)
        per_shard = slots // shards
        allocs = [PageAllocator(num_pages // shards) for _ in range(shards)]
        table = np.zeros((slots, kern.pages_per_slot(length)), np.int32)  # shard-local pages
        n_pages = np.zeros((slots,), np.int64)  # pages in each slot's table
        limit = np.zeros((slots,), np.int32)  # a slot steps while its position is below
        next_pos = np.zeros((slots,), np.int64)  # host mirror of the state's positions
        last_pos = np.zeros((slots,), np.int64)  # the last position a sample writes
        owner = [-1] * slots  # slot → row in the output
        item_of: list[Optional[tuple[int, int]]] = [None] * slots
        age = [0] * slots  # admission order
        pending = deque(queue)
        admitted = done = 0
        stats = PagedStats(pool_pages=num_pages - shards)
        self._group_stats.append(stats)

        def release(slot: int) -> None:
            allocs[slot // per_shard].release(table[slot, :n_pages[slot]].tolist())
            table[slot] = 0
            n_pages[slot] = limit[slot] = 0
            owner[slot] = -1

        def grow(slot: int) -> bool:
            alloc = allocs[slot // per_shard]
            end = min(next_pos[slot] + chunk, last_pos[slot] + 1)
            need = pages_for(int(end), p_size) - int(n_pages[slot])
            if need > alloc.free:
                limit[slot] = next_pos[slot]  # waits this chunk
                return False
            if need > 0:
                table[slot, n_pages[slot]:n_pages[slot] + need] = alloc.allocate(need)
                n_pages[slot] += need
            limit[slot] = n_pages[slot] * p_size
            return True

        def run_of(p: int) -> int:
            """Samples of prompt p at the head of the queue (how many could share pages)."""
            k = 0
            for q, _ in pending:
                if q != p:
                    break
                k += 1
            return k

        while done < len(queue):
            running = sorted((s for s in range(slots) if owner[s] >= 0), key=age.__getitem__)
            granted = {s: grow(s) for s in running}
            stats.waits += list(granted.values()).count(False)
            busy = {s // per_shard for s in running}
            stuck = [sh for sh in sorted(busy)
                     if not any(ok for s, ok in granted.items() if s // per_shard == sh)]
            if stuck:
                for sh in stuck:
                    stats.preemptions += 1
                    youngest = [s for s in running if s // per_shard == sh][-1]
                    item = item_of[youngest]
                    out.lengths[owner[youngest]] = 0
                    release(youngest)
                    pending.appendleft(item)  # type: ignore[arg-type]
                continue
            # shards open for admission: every sample running there got its pages
            free = {sh: [s for s in range(sh * per_shard, (sh + 1) * per_shard) if owner[s] < 0]
                    for sh in range(shards)
                    if all(ok for s, ok in granted.items() if s // per_shard == sh)}
            take, slots_for = [], []
            shared: dict[int, tuple[int, list[int]]] = {}  # prompt → (its shard, full pages)
            while pending:
                p, smp = pending[0]
                if p not in shared and len(shared) == self.prefill_batch:
                    break
                n = len(prompts[p]) - 1
                full = n // p_size
                private = pages_for(min(n + chunk, n + max_new), p_size) - full
                if p in shared:
                    sh, pages = shared[p]
                    if not free[sh] or private > allocs[sh].free:
                        break
                    allocs[sh].share(pages)
                else:
                    room = [sh for sh, f in free.items() if f and full + private <= allocs[sh].free]
                    if not room:
                        break
                    k = run_of(p)
                    sh = max(room, key=lambda h: (min(len(free[h]), k), allocs[h].free))
                    pages = allocs[sh].allocate(full)
                    shared[p] = (sh, pages)
                slot = free[sh].pop(0)
                table[slot, :full] = pages
                table[slot, full:full + private] = allocs[sh].allocate(private)
                n_pages[slot] = full + private
                limit[slot] = n_pages[slot] * p_size
                next_pos[slot], last_pos[slot] = n, n + max_new - 1
                owner[slot], item_of[slot], age[slot] = p * sampling.n + smp, (p, smp), admitted
                admitted += 1
                take.append(pending.popleft())
                slots_for.append(slot)
            if take:
                st = kern.put_tables(st, table, limit, np.array(owner) >= 0)
                st = self._admit_batch(params, st, prompts, take, slots_for, sampling, keys)
            if not any(owner[s] >= 0 and limit[s] > next_pos[s] for s in range(slots)):
                raise SamplingError(  # unreachable while _check_pool_fits holds; never spin
                    f"KV page pool of {num_pages - shards} pages cannot run the next sample; "
                    "raise rollout.kv_cache_gib")
            stats.peak_pages = max(stats.peak_pages, sum(a.capacity - a.free for a in allocs))
            st = kern.put_tables(st, table, limit, np.array(owner) >= 0)
            st, outs = kern.decode_chunk_jit(params, st, stop_ids, spec, chunk)
            for slot, emitted, finished in _collect(outs, owner, out):
                next_pos[slot] += emitted
                if finished:
                    release(slot)
                    done += 1

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
                     sampling: SamplingParams, keys: np.ndarray) -> DecodeState:
        """Prefill the distinct prompts of `take` once and insert each sample into its slot
        (the sample keys of prompt p use index keys[p])."""
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
            src[j], dst[j], last[j], pidx[j], sidx[j] = row_of[p], slot, prompts[p][-1], keys[p], s
        budget = np.full((slots,), sampling.max_new_tokens, np.int32)
        return self.kernels.admit_jit(params, st, tokens, lengths, src, dst, last, budget,
                                  np.uint32(sampling.seed % 2**32), pidx, sidx)


def _collect(outs: Any, owner: list[int], out: _RolloutBuffers) -> list[tuple[int, int, bool]]:
    """Copy a decode chunk's emitted tokens into `out` (slot → row `owner[slot]`); per slot
    that emitted: (slot, tokens emitted, whether its sample finished)."""
    o_tok, o_lp, o_em, o_fin = (np.asarray(x) for x in jax.device_get(tuple(outs)))
    result = []
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
        result.append((slot, n1 - n0, fin != FINISH_NONE))
    return result


def generate(engine: SamplingEngine, params: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams) -> Rollout:
    """Functional alias of `engine.generate`."""
    return engine.generate(params, prompts, sampling)
