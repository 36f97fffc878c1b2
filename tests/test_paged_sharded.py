"""The paged pool split over the sampler's slot shards (8 fake CPU devices, conftest): each
chip holds 1/shards of the pool, the decode chunk touches only its own block (no all-gather
or whole-pool copy in the compiled program), and the sharded engine returns the
single-device paged engine's and the dense engine's tokens and log-probs, bit for bit
(greedy and sampled, mixed prompt lengths, G > 1, stop tokens, a pool so small that samples
wait for pages)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl_jax.config import MeshConfig
from flowrl_jax.mesh import make_mesh
from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token
from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.testing import tiny_arch, tiny_model

NEW = 40
SLOTS = 16  # 2 per shard on 8 shards
PAGES_PER_SHARD = 10  # the longest sample (33 + 40 tokens) needs 9 pages of 8
KW = dict(decode_slots=SLOTS, decode_chunk=8, prefill_buckets=(32,), verbose=False,
          kv_cache="paged", page_size=8)
GREEDY = SamplingParams(n=2, max_new_tokens=NEW, temperature=0.0, seed=1)
SAMPLED = SamplingParams(n=3, max_new_tokens=NEW, temperature=0.9, top_k=10, seed=3,
                         stop_token_ids=(5, 7, 9, 11))


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) >= 8
    arch = tiny_arch(128)
    model = tiny_model(arch, seed=0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 1, 9, 17, 12, 33)]
    one = SamplingEngine(model, **KW)  # one device: one pool, one allocator
    # data parallel only: the slots (and pages) split 8 ways, the weights whole on each
    # chip, so every number is computed as on one device
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1), jax.devices()[:8])
    page_bytes = 8 * kv_bytes_per_token(arch, jnp.float32)
    sharded = SamplingEngine(model, mesh=mesh,
                             kv_cache_gib=8 * PAGES_PER_SHARD * page_bytes / 2**30, **KW)
    dense = SamplingEngine(model, **{**KW, "kv_cache": "dense"})  # the reference, one device
    return model, prompts, one, sharded, dense


def _same(a, b):
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.finish_reasons == b.finish_reasons
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_sharded_pool_holds_one_block_per_chip(setup):
    """Pool pages split over the slot axes: each chip's shard is pool / 8 pages."""
    model, _, _, sharded, _ = setup
    length = sharded.cache_length(33, NEW)
    pages = sharded.pool_pages(SLOTS, length)
    assert sharded.pool_shards(SLOTS) == 8 and pages == 8 * PAGES_PER_SHARD
    st = sharded.kernels.init_state(SLOTS, length, pages)
    k = st.pool[0].k
    assert k.shape[0] == pages and k.sharding.spec[0] == "data"
    assert {s.data.shape[0] for s in k.addressable_shards} == {PAGES_PER_SHARD}
    assert len(k.addressable_shards) == 8 and k.sharding.is_fully_replicated is False
    assert st.page_table.sharding.spec[0] == "data"
    # static tables (no allocator, the JetStream adapter's form): each shard's 2 slots own
    # pages 1.. of its block, in shard-local numbers
    static = sharded.kernels.init_state(SLOTS, length)
    width = sharded.kernels.pages_per_slot(length)
    assert static.pool[0].k.shape[0] == 8 * (2 * width + 1)
    table = np.asarray(static.page_table)
    for slot in range(SLOTS):
        np.testing.assert_array_equal(table[slot], 1 + (slot % 2) * width + np.arange(width))


def test_sharded_decode_and_admit_never_gather_the_pool(setup):
    """The compiled decode chunk and admit work on each chip's block: no all-gather of pool
    pages and no array of the whole pool's page count appears in the per-device programs."""
    model, _, _, sharded, _ = setup
    kern = sharded.kernels
    length = sharded.cache_length(33, NEW)
    pages = 8 * PAGES_PER_SHARD
    st = kern.abstract_state(SLOTS, length, pages)
    stop = np.full((8,), -1, np.int32)
    params = sharded.params_of(model)
    hlo = kern.decode_chunk_jit.lower(params, st, stop, SamplingSpec.of(SAMPLED),
                                      8).compile().as_text()
    local = tuple(st.pool[0].k.shape[1:])
    block = "[{},{}]".format(PAGES_PER_SHARD, ",".join(map(str, local)))
    whole = "[{},{}]".format(pages, ",".join(map(str, local)))
    assert block in hlo  # the program does hold each chip's block...
    assert whole not in hlo  # ...and never the whole pool
    pool_dims = ",".join(map(str, local)) + "]"  # [pages, kv heads, head_dim, page]
    gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", ln)]
    assert not [ln for ln in gathers if pool_dims in ln]
    # admitting (prefill + insert into the pages) writes each chip's block in place too
    vec = np.zeros((SLOTS,), np.int32)
    admit = kern.admit_jit.lower(params, st, np.zeros((8, 32), np.int32), np.zeros((8,), np.int32),
                                 vec, vec, vec, vec, np.uint32(0), vec, vec).compile().as_text()
    assert block in admit and whole not in admit


def test_sharded_greedy_equals_single_device(setup):
    """Greedy, G = 2: bit-identical tokens and log-probs to the single-device pool and to
    the dense engine."""
    model, prompts, one, sharded, dense = setup
    ref, got = one.generate(model, prompts, GREEDY), sharded.generate(model, prompts, GREEDY)
    _same(ref, got)
    _same(dense.generate(model, prompts, GREEDY), got)
    assert (got.lengths == NEW).all()


def test_sharded_sampling_with_scarce_pages_equals_single_device(setup):
    """Sampled, G = 3, stop ids, 2 slots and 9 usable pages per shard: samples finish at
    different steps, wait for pages (and get preempted), and still equal one device's and
    the dense engine's, bit for bit."""
    model, prompts, one, sharded, dense = setup
    admissions = []
    admit = sharded._admit_batch

    def recording(params, st, prompts_, take, slots_for, *rest):
        admissions.append([(p, slot // 2) for (p, _), slot in zip(take, slots_for)])
        return admit(params, st, prompts_, take, slots_for, *rest)

    sharded._admit_batch = recording
    try:
        ref, got = one.generate(model, prompts, SAMPLED), sharded.generate(model, prompts,
                                                                            SAMPLED)
    finally:
        del sharded._admit_batch
    _same(ref, got)
    _same(dense.generate(model, prompts, SAMPLED), got)
    # an admission puts a prompt's samples (which share its pages) on one shard
    for placed in admissions:
        shards_of = {}
        for p, shard in placed:
            assert shards_of.setdefault(p, shard) == shard, placed
    assert len({shard for placed in admissions for _, shard in placed}) == 8
    assert len(set(got.lengths.tolist())) > 3 and "stop" in got.finish_reasons
    st = sharded.paged_stats
    assert st.pool_pages == 8 * (PAGES_PER_SHARD - 1)
    assert st.waits > 0, st
    assert st.peak_pages <= st.pool_pages


def test_pool_too_small_for_one_sample_per_shard_names_the_split(setup):
    """The longest sample must fit one shard's block (a sample never spans shards)."""
    model, prompts, _, sharded, _ = setup
    arch = model.arch
    page_bytes = 8 * kv_bytes_per_token(arch, jnp.float32)
    small = SamplingEngine(model, mesh=sharded.mesh, kv_cache_gib=8 * 6 * page_bytes / 2**30,
                           **KW)  # 5 usable pages per shard: the 33-token prompt needs 9
    with pytest.raises(SamplingError, match=r"5 pages of 8 tokens per slot shard \(the pool "
                                            r"is split 8 ways\), but prompt 5 \(33 tokens\)"):
        small.generate(model, prompts, SAMPLED)


# ------------------------------------------------------------ the Pallas layout's pool split


@pytest.fixture(scope="module")
def pallas_engines(setup):
    """One device and 8 slot shards with the Pallas kernels (the GPU kernel in interpret mode
    on CPU), pools as in `setup`."""
    model, _, one, sharded, _ = setup
    kw = dict(KW, paged_attention="pallas")
    one_k = SamplingEngine(model, **kw)
    sharded_k = SamplingEngine(model, mesh=sharded.mesh, kv_cache_gib=sharded.kv_cache_gib, **kw)
    assert one_k.kernels.attention == sharded_k.kernels.attention == "pallas"
    return one_k, sharded_k


def test_pallas_pool_split_and_decode_never_gathers_it(pallas_engines, setup):
    """The kernel layout's pool [kv heads, pages, page, head_dim] splits its pages axis over
    the slot shards (a block per chip), and the compiled decode chunk and admit hold each
    chip's block, never the whole pool, with no all-gather of pool pages."""
    model = setup[0]
    _, sharded = pallas_engines
    kern = sharded.kernels
    length = sharded.cache_length(33, NEW)
    pages = sharded.pool_pages(SLOTS, length)
    assert sharded.pool_shards(SLOTS) == 8 and pages == 8 * PAGES_PER_SHARD
    st = kern.abstract_state(SLOTS, length, pages)
    k = st.pool[0].k
    assert k.shape[1] == pages and tuple(k.sharding.spec) == (None, "data", None, None)
    heads, _, page, hd = k.shape
    assert k.sharding.shard_shape(k.shape) == (heads, PAGES_PER_SHARD, page, hd)
    params = sharded.params_of(model)
    stop = np.full((8,), -1, np.int32)
    hlo = kern.decode_chunk_jit.lower(params, st, stop, SamplingSpec.of(SAMPLED),
                                      8).compile().as_text()
    block = f"[{heads},{PAGES_PER_SHARD},{page},{hd}]"
    whole = f"[{heads},{pages},{page},{hd}]"
    assert block in hlo and whole not in hlo
    pool_like = re.compile(rf"\[{heads},\d+,{page},{hd}\]")
    gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", ln)]
    assert not [ln for ln in gathers if pool_like.search(ln)]
    vec = np.zeros((SLOTS,), np.int32)
    admit = kern.admit_jit.lower(params, st, np.zeros((8, 32), np.int32), np.zeros((8,), np.int32),
                                 vec, vec, vec, vec, np.uint32(0), vec, vec).compile().as_text()
    assert block in admit and whole not in admit


def test_pallas_sharded_sampling_with_scarce_pages_equals_single_device(pallas_engines, setup):
    """The kernels per shard on shard-local page tables: sampled, G = 3, stop ids, samples
    waiting for pages: the single-device Pallas engine's tokens and log-probs, bit for bit."""
    model, prompts = setup[:2]
    one, sharded = pallas_engines
    ref, got = one.generate(model, prompts, SAMPLED), sharded.generate(model, prompts, SAMPLED)
    _same(ref, got)
    assert len(set(got.lengths.tolist())) > 3 and "stop" in got.finish_reasons
    assert sharded.paged_stats.waits > 0 and sharded.paged_stats.pool_pages == 8 * (
        PAGES_PER_SHARD - 1)
