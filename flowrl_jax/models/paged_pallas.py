"""Paged decode attention through JAX's Pallas kernels (`rollout.paged_attention: pallas`),
and the page-pool layout those kernels read.

Layout. JAX's paged-attention kernels (TPU: `pallas.ops.tpu.paged_attention`, NVIDIA GPU:
`pallas.ops.gpu.paged_attention`) read keys and values as [kv_heads, pages, page_size,
head_dim]: a page is a positions-major [page_size, head_dim] tile per kv head, what a DMA or a
Triton load copies in one piece. The XLA path's pool (models/paged_decode.py) keeps positions
minor instead, so that gathering a slot's pages gives the dense decode row. This module holds
the kernel layout's pool (`KernelPagedCache`), its writes (one decode token; a prompt's pages
at admission) and the attention call; the page tables, allocator and null page are shared.

Kernels. On TPU the TPU kernel (no interpret mode of its own; Pallas' TPU interpret mode runs
it on CPU for tests); on GPU the Triton kernel; on any other platform the GPU kernel in
Pallas' interpret mode (exact, slow: for tests). Neither kernel scales the scores: q is
scaled by head_dim^-0.5 before the call. Under a mesh (`mesh.current_mesh`) the kernel runs
per device in a `shard_map` over the batch (data × fsdp) and, when kv heads and query heads
split alike over `tensor`, over heads (as models/splash.py). The sampler splits the pool's
pages over its slot shards instead (sampling/paged_kernels.py): it calls the kernel inside
its own per-shard map (`per_device=True`), on the shard's block with shard-local page tables.

Idle rows pass length 0: the TPU kernel skips their blocks (no DMA, no compute) and leaves
their output unwritten, the GPU kernel skips every partition (zeros); either way their
output is set to 0 here.

Constraints found in the kernels' source and by compiling (JAX 0.10, libtpu 0.0.42.1). TPU:
head_dim a multiple of 128 (the kernel's m/l outputs reuse q's block spec, whose last dim
must then divide by 128: Qwen2.5-0.5B's 64 is refused, 1.5B/7B/32B's 128 compile); pages per
sequence a multiple of pages_per_compute_block; keys and values are rounded to bfloat16
inside the kernel (float32 pools lose precision there), so Mosaic refuses the kernel under
`jax_default_matmul_precision` highest (a ConfigError says so, as splash attention's does);
megacore modes left off (they may
hang on chips without two cores). GPU (Triton): every load's size a power of two (page_size,
head_dim, pages_per_compute_block); pages per sequence a multiple of k_splits; query heads
per kv head padded to 16. "auto" falls back to xla where a kernel does not fit; "pallas"
there is an error naming the constraint.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flowrl_jax.config import ModelArch
from flowrl_jax.errors import ConfigError
from flowrl_jax.mesh import current_mesh, current_platform, logical_to_spec

Array = jax.Array

#: logical axes of the kernel layout's pool: heads over `tensor`; the pages (dim 1) are split
#: over the sampler's slot shards, whose axes the sampler takes from the slots' sharding
KERNEL_POOL_AXES = ("kv_heads", None, None, "head_dim")
#: the pool's pages dimension in the kernel layout
KERNEL_PAGES_DIM = 1
#: `rollout.paged_attention` values: "xla" gathers pages and runs the dense decode attention
#: (every platform), "pallas" the Pallas kernels over the kernel layout, "auto" pallas on
#: TPU and GPU, xla elsewhere
PAGED_ATTENTION = ("auto", "xla", "pallas")
#: platforms where "auto" picks the Pallas kernels
KERNEL_PLATFORMS = ("tpu", "gpu", "cuda")
#: TPU: most key positions one kernel step copies into VMEM (pages_per_compute_block ×
#: page_size; double-buffered keys and values of 512 × 128 bf16 are 512 KiB)
TPU_BLOCK_POSITIONS = 512
#: GPU: the kernel's defaults, lowered to divisors of the page-table width
GPU_K_SPLITS = 16
GPU_PAGES_PER_BLOCK = 8


class KernelPagedCache(NamedTuple):
    """One layer's page pool in the kernels' layout: k, v [kv_heads, pages, page_size, head_dim]."""

    k: Array
    v: Array

    @property
    def page_size(self) -> int:
        """Positions per page."""
        return self.v.shape[2]

    @property
    def num_pages(self) -> int:
        """Pages in the pool (page 0, the null page, included)."""
        return self.v.shape[1]


def unsupported(platform: str, head_dim: int, page_size: int) -> Optional[str]:
    """Why the compiled kernel of `platform` cannot run these shapes (None: it can; other
    platforms interpret the GPU kernel, which takes any shape)."""
    if platform == "tpu" and head_dim % 128:
        return f"the TPU kernel needs head_dim a multiple of 128, got {head_dim}"
    if platform in ("gpu", "cuda"):
        for name, n in (("head_dim", head_dim), ("page_size", page_size)):
            if n & (n - 1):
                return f"the GPU kernel needs {name} a power of two, got {n}"
    return None


def resolve(choice: str, platform: str, head_dim: int, page_size: int) -> str:
    """The paged attention that `rollout.paged_attention` = `choice` runs on `platform`:
    "xla" or "pallas" ("auto": pallas on TPU and GPU where the kernel fits the shapes)."""
    if choice not in PAGED_ATTENTION:
        raise ValueError(f"paged_attention must be one of {PAGED_ATTENTION}, got {choice!r}")
    why = unsupported(platform, head_dim, page_size)
    if choice == "auto":
        return "pallas" if platform in KERNEL_PLATFORMS and why is None else "xla"
    if choice == "pallas" and why is not None:
        raise ValueError(f"paged_attention pallas on {platform}: {why}; use xla (or auto)")
    return choice


def kernel_pool_shape(arch: ModelArch, num_pages: int,
                      page_size: int) -> tuple[int, int, int, int]:
    """Shape of one layer's key (and value) pool: [kv_heads, pages, page_size, head_dim]."""
    return (arch.num_key_value_heads, num_pages, page_size, arch.resolved_head_dim)


def empty_kernel_pool(arch: ModelArch, num_pages: int, page_size: int,
                      dtype: Any) -> list[KernelPagedCache]:
    """A zeroed kernel-layout pool, one `KernelPagedCache` per layer."""
    shape = kernel_pool_shape(arch, num_pages, page_size)
    return [KernelPagedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(arch.num_hidden_layers)]


def _heads(pool: KernelPagedCache) -> Array:
    """[kv_heads, 1] head indices. Writes index the heads explicitly so that each scatter
    window is the trailing dims alone (a head_dim row, or a whole [page_size, head_dim] page):
    with `pool[:, pages]` the TPU compiler lays the pool out heads-minor for the scatter and
    copies all of it back to the kernel's row-major layout at every decode step."""
    return jnp.arange(pool.k.shape[0], dtype=jnp.int32)[:, None]


def write_token(pool: KernelPagedCache, k: Array, v: Array, page: Array,
                col: Array) -> KernelPagedCache:
    """The pool with keys k and values v [B, kv_heads, head_dim] written at position `col` [B]
    of page `page` [B] (in place when donated; idle rows aim at the null page)."""
    h, page, col = _heads(pool), page[None, :], col[None, :]

    def put(a: Array, x: Array) -> Array:
        return a.at[h, page, col].set(x.transpose(1, 0, 2).astype(a.dtype))

    return KernelPagedCache(put(pool.k, k), put(pool.v, v))


def write_pages(pool: KernelPagedCache, dest: Array, k_pages: Array,
                v_pages: Array) -> KernelPagedCache:
    """The pool with whole pages written: k_pages, v_pages [N, kv_heads, head_dim, page_size]
    (the XLA layout's pages, as the prefill's rows cut) into pool pages `dest` [N]
    (out-of-range entries dropped)."""
    h, dest = _heads(pool), dest[None, :]

    def put(a: Array, x: Array) -> Array:
        return a.at[h, dest].set(x.transpose(1, 0, 3, 2).astype(a.dtype), mode="drop")

    return KernelPagedCache(put(pool.k, k_pages), put(pool.v, v_pages))


def _largest_divisor(n: int, at_most: int, power_of_two: bool = False) -> int:
    """The largest divisor of n that is <= at_most (a power of two if asked); at least 1."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1)
               if n % d == 0 and (not power_of_two or d & (d - 1) == 0))


def _call_kernel(q: Array, k: Array, v: Array, lengths: Array, table: Array, kernel: str,
                 interpret: bool) -> Array:
    """One device's kernel call: q [B, Hq, D], k/v [Hkv, pages, page_size, D], lengths [B],
    table [B, T] → [B, Hq, D] in q's dtype."""
    width, page_size = table.shape[1], k.shape[2]
    if kernel == "tpu":
        # the TPU kernel's module is only needed by programs that use it
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_pa

        blocks = _largest_divisor(width, max(1, TPU_BLOCK_POSITIONS // page_size))
        mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
        with mode:
            return tpu_pa(q, k, v, lengths, table, pages_per_compute_block=blocks)
    # the GPU kernel's module imports Triton bindings: only for programs that use it
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_pa

    splits = _largest_divisor(width, GPU_K_SPLITS)
    blocks = _largest_divisor(width // splits, GPU_PAGES_PER_BLOCK, power_of_two=True)
    return gpu_pa(q, k, v, table, lengths, k_splits=splits, pages_per_compute_block=blocks,
                  interpret=interpret)


def kernel_for(platform: str) -> tuple[str, bool]:
    """(kernel, interpret) for a platform: the TPU kernel on TPU, else the GPU kernel,
    compiled on GPU and interpreted elsewhere."""
    if platform == "tpu":
        return "tpu", False
    return "gpu", platform not in ("gpu", "cuda")


def paged_attention(q: Array, pool: KernelPagedCache, table: Array, lengths: Array,
                    kernel: Optional[str] = None, interpret: Optional[bool] = None,
                    per_device: bool = False) -> Array:
    """One query token's attention over each sample's pages through a Pallas kernel:
    q [B, K, G, D], page tables `table` [B, T], `lengths` [B] visible positions (the first
    lengths[b] of the row; 0: an idle row, skipped, output 0) → [B, K, G, D] float32.
    `kernel`/`interpret` default to the traced program's platform (`kernel_for`); tests force
    the TPU kernel in interpret mode. `per_device`: the arrays are one device's shards
    already (inside a caller's `shard_map`): the kernel is called on them directly."""
    b, kh, g, d = q.shape
    if kernel is None:
        kernel, default_interpret = kernel_for(current_platform())
        interpret = default_interpret if interpret is None else interpret
    interpret = bool(interpret)
    precision = str(jax.config.jax_default_matmul_precision or "").lower()
    if kernel == "tpu" and not interpret and precision in ("highest", "float32"):
        # the kernel multiplies float32 queries by bfloat16 keys: Mosaic rejects fp32-pass
        # products of those ("Bad rhs type")
        raise ConfigError(f"rollout.paged_attention pallas: the TPU kernel needs the default "
                          f"matmul precision, not jax_default_matmul_precision={precision!r}; "
                          f"unset it or set rollout.paged_attention=xla")
    # neither kernel scales the scores; q in the pool's dtype, as the XLA path's products
    qs = (q.astype(jnp.float32) * d ** -0.5).astype(pool.k.dtype).reshape(b, kh * g, d)
    table = table.astype(jnp.int32)
    lengths = lengths.astype(jnp.int32)
    fn = functools.partial(_call_kernel, kernel=kernel, interpret=interpret)
    mesh = current_mesh()
    if per_device or mesh is None or mesh.devices.size == 1:
        out = fn(qs, pool.k, pool.v, lengths, table)
    else:
        q_spec = logical_to_spec(("batch", "heads", None), mesh, qs.shape)
        k_spec = logical_to_spec(KERNEL_POOL_AXES, mesh, pool.k.shape)
        if q_spec[1] != k_spec[0]:  # a shard must hold whole GQA groups: heads stay whole
            q_spec = PartitionSpec(q_spec[0], None, None)
            k_spec = PartitionSpec(None, None, None, None)
        row_spec = PartitionSpec(q_spec[0])
        out = jax.shard_map(fn, mesh=mesh,
                            in_specs=(q_spec, k_spec, k_spec, row_spec,
                                      PartitionSpec(q_spec[0], None)),
                            out_specs=q_spec, check_vma=False)(qs, pool.k, pool.v, lengths, table)
    # idle rows (length 0): the TPU kernel never writes their output block
    out = jnp.where((lengths > 0)[:, None, None], out.astype(jnp.float32), 0.0)
    return out.reshape(b, kh, g, d)
