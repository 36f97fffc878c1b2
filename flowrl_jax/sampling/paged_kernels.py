"""The paged engine's compiled device functions (`PagedKernels`): the `Kernels` interface
(kernels.py: prefill, insert, admit, decode_chunk and their jitted forms, init_state) over a
decode state whose KV cache is a page pool per layer plus a page table per slot
(models/paged_decode.py).

The device never allocates: the host (engine.py with pages.py) owns the page tables and
pushes them, with each slot's `limit`, into the state between chunks. A slot steps while
it is active and its position is below its limit (the positions its pages cover); the host
grants a slot pages for a whole chunk or none, so a slot that runs, runs every step of the
chunk until it finishes (what `cpu_fast_paths.chunk_noise` relies on), and one that waits
keeps its place. Idle and waiting slots write into the null page (pages.NULL_PAGE).

The pool's layout follows `attention`: "xla" keeps paged_decode.py's positions-minor pages,
"pallas" the kernels' [kv_heads, pages, page_size, head_dim] (models/paged_pallas.py); only
the pool's shape, its writes and the attention call differ.

`init_state(slots, length)` without `num_pages` gives every slot its own contiguous pages
(a dense-sized pool behind static tables; the JetStream adapter runs so): the decode path is
the same, only the host-side allocation is missing.

On a mesh the pool is split into one block of pages per slot shard (`shards`), in either
layout (its pages axis: dim 0 for "xla", dim 1 for "pallas"): slot s belongs to shard
s // (slots / shards), gets pages of its shard only, and its table holds shard-local page
numbers; decode writes and attention (the xla gather or the Pallas kernel) run per shard
(`jax.shard_map` over the slot axes), and `insert` scatters each shard's pages on that
shard. The pool's size is the total over shards (`num_pages` = shards × pages per shard).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flowrl_jax.config import ModelArch
from flowrl_jax.mesh import batch_sharding, compute_platform, logical_to_spec
from flowrl_jax.models import paged_pallas
from flowrl_jax.models.decode import DecodeCache, rope_table
from flowrl_jax.models.paged_decode import (ATTENTION_IMPLS, POOL_AXES, PagedCache, empty_pool,
                                            paged_decode_forward, pool_shape)
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM
from flowrl_jax.sampling import cpu_fast_paths
from flowrl_jax.sampling.kernels import ChunkOut, KernelsBase, finish_reasons, with_shardings
from flowrl_jax.sampling.kv_budget import pages_for
from flowrl_jax.sampling.logits import sample_logits
from flowrl_jax.sampling.pages import NULL_PAGE
from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.sampling.random import key_width, step_keys
from flowrl_jax.sampling.results import FINISH_NONE

Array = jax.Array

#: `limit` of a slot that may always step (static page tables)
NO_LIMIT = np.iinfo(np.int32).max


class PagedState(NamedTuple):
    """Everything the paged decode loop carries; per-slot fields as in kernels.DecodeState."""

    pool: list[Any]  # per layer: PagedCache ("xla") or paged_pallas.KernelPagedCache
    #                  ("pallas"), pages in one block per slot shard
    page_table: Array  # [slots, pages per slot] int32 shard-local pages, NULL_PAGE where unused
    limit: Array  # [slots] int32 a slot steps while pos < limit
    token: Array  # [slots] int32 token fed at the next step
    pos: Array  # [slots] int32 its position
    active: Array  # [slots] bool
    generated: Array  # [slots] int32 tokens generated so far
    budget: Array  # [slots] int32 max new tokens
    keys: Array  # [slots, key_width()] uint32 per-sample base key


class PagedKernels(KernelsBase):
    """The paged device functions for one (model graph, mesh, cache dtype, page size); shared
    per key (`paged_kernels_for`) like `Kernels`. The prefill and admission are the dense
    kernels' (`KernelsBase`): the prefill's dense rows are cut into pages by `insert`.
    `attention`: "xla" or "pallas" (resolved: paged_pallas.resolve), which fixes the layout."""

    def __init__(self, graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any,
                 page_size: int, attention: str = "xla"):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.page_size = int(page_size)
        self.attention = attention
        super().__init__(graphdef, arch, mesh, cache_dtype)

    def pages_per_slot(self, length: int) -> int:
        """Page-table width for a cache of `length` positions."""
        return pages_for(length, self.page_size)

    # ----------------------------------------------------------------- shardings

    def slot_axes(self, slots: int) -> tuple[str, ...]:
        """The mesh axes `slots` decode slots (and so the pool's pages) are split over."""
        if self.mesh is None:
            return ()
        names = batch_sharding(self.mesh, 1, (slots,)).spec[0]
        return (names,) if isinstance(names, str) else tuple(names or ())

    def shards(self, slots: int) -> int:
        """Slot shards of a state of `slots` slots: each has its own block of the pool."""
        return int(np.prod([self.mesh.shape[a] for a in self.slot_axes(slots)], dtype=np.int64))

    def pool_sharding(self, slots: int, num_pages: int) -> Optional[NamedSharding]:
        """The pool arrays' sharding: pages over the slots' axes (taken from the slots so
        that the blocks line up), kv heads over `tensor`, in this attention's layout."""
        if self.mesh is None:
            return None
        axes, shape, pages_dim = self._pool_layout(num_pages)
        rest = list(logical_to_spec(axes[:pages_dim] + axes[pages_dim + 1:], self.mesh,
                                    shape[:pages_dim] + shape[pages_dim + 1:]))
        rest.insert(pages_dim, _spec_entry(self.slot_axes(slots)))
        return NamedSharding(self.mesh, PartitionSpec(*rest))

    def pool_split(self, slots: int, num_pages: int) -> int:
        """Chips one pool array is split over (slot shards × kv-head shards)."""
        sh = self.pool_sharding(slots, num_pages)
        if sh is None:
            return 1
        _, shape, _ = self._pool_layout(num_pages)
        return int(np.prod(shape, dtype=np.int64) // np.prod(sh.shard_shape(shape), dtype=np.int64))

    def _pool_specs(self, slots: int, num_pages: int) -> tuple[PartitionSpec, Any, Any]:
        """(pool spec, slot-axes entry, kv-heads entry) of a sharded pool."""
        spec = self.pool_sharding(slots, num_pages).spec
        kv = spec[1] if self.attention == "xla" else spec[0]
        return spec, _spec_entry(self.slot_axes(slots)), kv

    def _per_shard(self, slots: int, num_pages: int) -> Optional[Any]:
        """`paged_decode_forward`'s per_shard: the layer's write + attention (xla's gather or
        the Pallas kernel) mapped over the slot shards (None with one shard: the plain,
        unmapped program)."""
        if self.shards(slots) == 1:
            return None
        pool, a, kv = self._pool_specs(slots, num_pages)
        cache = self._pool_cache
        # the last argument: xla's visible mask [B, 1, 1, S], the kernels' lengths [B]
        seen = (PartitionSpec(a) if self.attention == "pallas"
                else PartitionSpec(a, None, None, None))
        in_specs = (cache(pool, pool), PartitionSpec(a, kv, None, None),
                    PartitionSpec(a, kv, None), PartitionSpec(a, kv, None), PartitionSpec(a),
                    PartitionSpec(a), PartitionSpec(a, None), seen)
        out_specs = (PartitionSpec(a, kv, None, None), cache(pool, pool))
        # Pallas calls carry no varying-axes types: the kernels' maps run unchecked
        return lambda f: jax.shard_map(f, mesh=self.mesh, in_specs=in_specs,
                                       out_specs=out_specs,
                                       check_vma=self.attention != "pallas")

    def state_shardings(self, slots: int, length: int, num_pages: int) -> Optional[PagedState]:
        """NamedShardings of a paged state (None without a mesh)."""
        if self.mesh is None:
            return None
        ps = self.pool_sharding(slots, num_pages)
        b1 = batch_sharding(self.mesh, 1, (slots,))
        tab = batch_sharding(self.mesh, 2, (slots, self.pages_per_slot(length)))
        b2 = batch_sharding(self.mesh, 2, (slots, key_width()))
        cache = self._pool_cache
        return PagedState([cache(ps, ps) for _ in range(self.arch.num_hidden_layers)],
                          tab, b1, b1, b1, b1, b1, b1, b2)

    @property
    def _pool_cache(self) -> type:
        """The per-layer pool container of this attention's layout."""
        return paged_pallas.KernelPagedCache if self.attention == "pallas" else PagedCache

    def _pool_layout(self, num_pages: int) -> tuple[tuple, tuple[int, ...], int]:
        """(logical axes, shape, pages dim) of one layer's pool array in this attention's
        layout."""
        if self.attention == "pallas":
            return (paged_pallas.KERNEL_POOL_AXES,
                    paged_pallas.kernel_pool_shape(self.arch, num_pages, self.page_size),
                    paged_pallas.KERNEL_PAGES_DIM)
        return POOL_AXES, pool_shape(self.arch, num_pages, self.page_size), 0

    def _dims(self, st: PagedState) -> tuple[int, int, int]:
        return st.token.shape[0], st.page_table.shape[1] * self.page_size, st.pool[0].num_pages

    def constrain(self, st: PagedState) -> PagedState:
        """`st` constrained to its shardings (as it is without a mesh). Traced."""
        sh = self.state_shardings(*self._dims(st))
        return st if sh is None else jax.lax.with_sharding_constraint(st, sh)

    def put_tables(self, st: PagedState, table: np.ndarray, limit: np.ndarray,
                   active: np.ndarray) -> PagedState:
        """`st` with the host's page tables, limits and active flags (copies of them)."""
        sh = self.state_shardings(*self._dims(st))
        arrays = (np.array(table, np.int32), np.array(limit, np.int32), np.array(active, bool))
        if sh is None:
            t, lim, act = (jax.device_put(a, self.device) for a in arrays)
        else:
            t, lim, act = (jax.device_put(a, s) for a, s in
                           zip(arrays, (sh.page_table, sh.limit, sh.active)))
        return st._replace(page_table=t, limit=lim, active=act)

    def init_state(self, slots: int, length: int, num_pages: Optional[int] = None) -> PagedState:
        """An empty paged state (all slots idle). With `num_pages`: a pool of that many pages
        and empty tables (the host allocates); without: static tables, each slot owning
        pages_per_slot(length) pages of a pool sized for all of them."""
        key = (slots, length, num_pages)
        if key not in self._init_fns:  # one compiled initialiser per shape
            n = self._pool_pages(slots, length, num_pages)
            self._init_fns[key] = jax.jit(lambda: self._empty_state(slots, length, num_pages),
                                          out_shardings=self.state_shardings(slots, length, n))
        return self._init_fns[key]()

    def abstract_state(self, slots: int, length: int,
                       num_pages: Optional[int] = None) -> PagedState:
        """`init_state`'s result as ShapeDtypeStructs with their shardings (nothing allocated)."""
        return with_shardings(jax.eval_shape(lambda: self._empty_state(slots, length, num_pages)),
                              self.state_shardings(slots, length,
                                                   self._pool_pages(slots, length, num_pages)))

    def _pool_pages(self, slots: int, length: int, num_pages: Optional[int]) -> int:
        """The pool's pages: `num_pages`, or (static tables) each shard's slots' pages + its
        null page, over all shards."""
        if num_pages is not None:
            return num_pages
        shards = self.shards(slots)
        return shards * (slots // shards * self.pages_per_slot(length) + 1)

    def _empty_state(self, slots: int, length: int, num_pages: Optional[int]) -> PagedState:
        width = self.pages_per_slot(length)
        n = self._pool_pages(slots, length, num_pages)
        if n % self.shards(slots):
            raise ValueError(f"a pool of {n} pages does not split into {self.shards(slots)} "
                             "slot shards")
        make = paged_pallas.empty_kernel_pool if self.attention == "pallas" else empty_pool
        pool = make(self.arch, n, self.page_size, self.cache_dtype)
        zi = jnp.zeros((slots,), jnp.int32)
        if num_pages is None:  # static: local slot s of a shard owns its pages 1 + s·width ...
            per_shard = slots // self.shards(slots)
            table = 1 + jnp.arange(slots * width, dtype=jnp.int32).reshape(slots, width) % (
                per_shard * width)
            limit = jnp.full((slots,), NO_LIMIT, jnp.int32)
        else:
            table = jnp.full((slots, width), NULL_PAGE, jnp.int32)
            limit = zi
        return PagedState(pool, table, limit, zi, zi, jnp.zeros((slots,), bool), zi, zi,
                          jnp.zeros((slots, key_width()), jnp.uint32))

    # ----------------------------------------------------------------- traced functions

    def insert(self, st: PagedState, prefix: list[DecodeCache], src: Array, dst: Array,
               last_token: Array, pos: Array, budget: Array, keys: Array) -> PagedState:
        """Copy prefix rows `src` [M] into the pages of slots `dst` [M] (out-of-range dst =
        no-op), through the slots' page tables (set by the host before), and start them as
        `Kernels.insert` does. Of a prefix of n positions the first ceil(n / page_size) pages
        are written; samples of one prompt that share its full pages write the same values
        there, and each writes its own copy of the partly filled last page."""
        slots, length, n_pages = self._dims(st)
        p_size = self.page_size
        plen = prefix[0].length
        width = min(pages_for(plen, p_size), st.page_table.shape[1])
        if self.shards(slots) > 1:
            pool = self._insert_per_shard(st, prefix, src, dst, pos, width)
        else:
            rows = st.page_table.at[dst].get(mode="fill", fill_value=NULL_PAGE)[:, :width]
            needed = jnp.arange(width)[None, :] < ((pos + p_size - 1) // p_size)[:, None]
            dest = jnp.where(needed & (dst < slots)[:, None], rows, n_pages).reshape(-1)  # OOB

            def pages(a: Array) -> Array:  # prefix rows [B, K, D, n] → rows src as [M·W, K, D, P]
                return self._as_pages(a, width)[src].reshape(-1, *a.shape[1:3], p_size)

            pool = []
            for c, pc in zip(st.pool, prefix):
                if self.attention == "pallas":
                    pool.append(paged_pallas.write_pages(c, dest, pages(pc.k), pages(pc.v)))
                else:
                    pool.append(PagedCache(
                        c.k.at[dest].set(pages(pc.k).astype(c.k.dtype), mode="drop"),
                        c.v.at[dest].set(pages(pc.v).astype(c.v.dtype), mode="drop")))

        def put(a, x):
            return a.at[dst].set(x.astype(a.dtype), mode="drop")

        st = st._replace(pool=pool, token=put(st.token, last_token), pos=put(st.pos, pos),
                         active=put(st.active, jnp.ones_like(dst, bool)),
                         generated=put(st.generated, jnp.zeros_like(dst)),
                         budget=put(st.budget, budget), keys=put(st.keys, keys))
        return self.constrain(st)

    def _as_pages(self, a: Array, width: int) -> Array:
        """Prefix rows [B, K, D, n] as their first `width` pages [B, width, K, D, P]."""
        p_size = self.page_size
        pad = width * p_size - a.shape[3]
        if pad > 0:
            a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad)))
        b, k, d, _ = a.shape
        return a[..., :width * p_size].reshape(b, k, d, width, p_size).transpose(0, 3, 1, 2, 4)

    def _insert_per_shard(self, st: PagedState, prefix: list[DecodeCache], src: Array,
                          dst: Array, pos: Array, width: int) -> list[Any]:
        """`insert`'s page writes on a sharded pool (either layout): indexed by slot (which
        prefix row each slot takes, -1 for none), so each shard cuts pages for its own slots
        only and writes them into its block (the prefix rows, a few prompts, go to every
        shard)."""
        slots, _, _ = self._dims(st)
        p_size = self.page_size
        row_of = jnp.full((slots,), -1, jnp.int32).at[dst].set(src.astype(jnp.int32), mode="drop")
        pos_of = jnp.zeros((slots,), jnp.int32).at[dst].set(pos.astype(jnp.int32), mode="drop")
        spec, a, kv = self._pool_specs(slots, st.pool[0].num_pages)
        kernel_layout = self.attention == "pallas"

        def local(block: Any, table: Array, row_of: Array, pos_of: Array,
                  pk: Array, pv: Array) -> Any:
            n = block.num_pages
            needed = (jnp.arange(width)[None, :] < ((pos_of + p_size - 1) // p_size)[:, None])
            dest = jnp.where(needed & (row_of >= 0)[:, None], table[:, :width], n).reshape(-1)
            rows = jnp.maximum(row_of, 0)

            def pages(pre: Array) -> Array:  # [slots · width, K, D, P], the xla layout's pages
                return self._as_pages(pre, width)[rows].reshape(-1, *pre.shape[1:3], p_size)

            if kernel_layout:
                return paged_pallas.write_pages(block, dest, pages(pk), pages(pv))
            return PagedCache(*(c.at[dest].set(pages(pre).astype(c.dtype), mode="drop")
                                for c, pre in ((block.k, pk), (block.v, pv))))

        prefix_spec = PartitionSpec(None, kv, None, None)  # every shard: all prompts, its heads
        cache = self._pool_cache
        run = jax.shard_map(local, mesh=self.mesh,
                            in_specs=(cache(spec, spec), PartitionSpec(a, None),
                                      PartitionSpec(a), PartitionSpec(a), prefix_spec,
                                      prefix_spec),
                            out_specs=cache(spec, spec))
        return [run(c, st.page_table, row_of, pos_of, pc.k, pc.v)
                for c, pc in zip(st.pool, prefix)]

    def _step(self, model: Qwen2ForCausalLM, st: PagedState, stop_ids: Array,
              spec: SamplingSpec, rope: tuple[Array, Array], mats: Any, products: str,
              noise: Optional[Array] = None):
        """One decode step of the slots that may step (`Kernels._step` over pages)."""
        length = st.page_table.shape[1] * self.page_size
        act = st.active & (st.pos < st.limit)
        pos = jnp.minimum(st.pos, length - 1)
        page = jnp.take_along_axis(st.page_table, (pos // self.page_size)[:, None], axis=1)[:, 0]
        page = jnp.where(act, page, NULL_PAGE)
        slots, _, n_pages = self._dims(st)
        logits, pool = paged_decode_forward(model, st.token, pos, page, st.pool, st.page_table,
                                            rope, mats, products, self.attention,
                                            self._per_shard(slots, n_pages), active=act)
        logits = logits.astype(jnp.float32)
        keys = None if noise is not None else step_keys(st.keys, st.generated)
        tok, logp = sample_logits(logits, keys, spec, noise)
        gen = st.generated + 1
        finish = finish_reasons(act, tok, gen, st.budget, pos, length, stop_ids)
        new = st._replace(pool=pool, token=jnp.where(act, tok, st.token),
                          pos=st.pos + act.astype(jnp.int32),
                          active=st.active & (finish == FINISH_NONE),
                          generated=jnp.where(act, gen, st.generated))
        return self.constrain(new), (tok, logp, act, finish.astype(jnp.int32))

    def decode_chunk(self, params: Any, st: PagedState, stop_ids: Array, spec: SamplingSpec,
                     chunk: int) -> tuple[PagedState, ChunkOut]:
        """Up to `chunk` decode steps on device; stops early when no slot can step. One loop
        over the whole page table (no attention windows: one program per shape)."""
        model = nnx.merge(self.graphdef, params)
        slots, length, _ = self._dims(st)
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
            return (i < chunk) & jnp.any(s.active & (s.pos < s.limit))

        def body(c):
            i, s, outs = c
            s, row = self._step(model, s, stop_ids, spec, rope, mats, products,
                                None if noise is None else noise[i])
            return i + 1, s, ChunkOut(*[o.at[i].set(r) for o, r in zip(outs, row)])

        with compute_platform(self.mesh):  # the attention kernel for the mesh's devices
            _, st, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), st, outs))
        return st, outs


def _spec_entry(axes: tuple[str, ...]) -> Any:
    """A PartitionSpec entry for mesh `axes`: None, one name, or the tuple."""
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


_PAGED_KERNELS: dict[tuple, PagedKernels] = {}


def paged_kernels_for(graphdef: Any, arch: ModelArch, mesh: Optional[Mesh], cache_dtype: Any,
                      page_size: int, attention: str = "xla") -> PagedKernels:
    """The shared `PagedKernels` of a model graph on a mesh."""
    key = (graphdef, arch, mesh, jnp.dtype(cache_dtype).name, int(page_size), attention)
    if key not in _PAGED_KERNELS:
        _PAGED_KERNELS[key] = PagedKernels(graphdef, arch, mesh, cache_dtype, page_size, attention)
    return _PAGED_KERNELS[key]
