"""Paged KV cache: the page allocator, the byte arithmetic, the page gather, and the paged
engine against the dense one (same seeds → the same tokens and float32 log-probs, bit for
bit) with shared prompt pages, stop tokens, samples finishing at different steps and a pool
so small that samples wait for pages and get preempted."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from flowrl_jax.config import ConfigError, RolloutConfig, preset_arch
from flowrl_jax.models.paged_decode import gather_rows
from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token, pages_for, pool_pages
from flowrl_jax.sampling.pages import NULL_PAGE, PageAllocator
from flowrl_jax.testing import tiny_arch, tiny_model

NEW = 40
KW = dict(decode_slots=8, decode_chunk=8, prefill_buckets=(32,), verbose=False)
SAMPLED = SamplingParams(n=3, max_new_tokens=NEW, temperature=0.9, top_k=10, seed=3,
                         stop_token_ids=(5, 7, 9, 11))


def test_allocator_free_list_and_reference_counts():
    a = PageAllocator(6)
    assert (a.capacity, a.free) == (5, 5)
    shared = a.allocate(2)
    assert NULL_PAGE not in shared and len(set(shared)) == 2
    a.share(shared)  # a second sample points at the prompt's pages
    own = a.allocate(3)
    assert a.free == 0 and not set(own) & set(shared)
    with pytest.raises(RuntimeError, match="exhausted"):
        a.allocate(1)
    a.release(shared + own)  # the first sample finishes: only its own pages come back
    assert a.free == 3
    a.release(shared)
    assert a.free == 5
    with pytest.raises(RuntimeError, match="released more often"):
        a.release(shared[:1])
    a.release([NULL_PAGE])  # unused table entries release nothing
    assert a.free == 5
    with pytest.raises(ValueError, match="at least 2 pages"):
        PageAllocator(1)


def test_kv_budget_arithmetic():
    arch = preset_arch("qwen2.5-7b")
    # 28 layers × keys+values × 4 kv heads × 128 × 2 B (bf16): the issue's ≈57 KB per token
    assert kv_bytes_per_token(arch, jnp.bfloat16) == 28 * 2 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(arch, jnp.float32) == 2 * 57344
    assert [pages_for(n, 64) for n in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]
    assert pool_pages(10 * 57344 * 64 + 57344, arch, jnp.bfloat16, 64) == 10
    assert pool_pages(-5, arch, jnp.bfloat16, 64) == 0
    with pytest.raises(ValueError, match="page_size"):
        pages_for(3, 0)


def test_gather_rows_is_the_dense_row_in_table_order():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(7, 2, 3, 4)).astype(np.float32)  # [pages, K, D, P]
    table = np.array([[3, 1, 0], [6, 2, 5]], np.int32)
    rows = np.asarray(gather_rows(jnp.asarray(pool), jnp.asarray(table)))
    assert rows.shape == (2, 2, 3, 12)
    for b in range(2):
        for t in range(12):  # position t lives at column t % P of page table[t // P]
            np.testing.assert_array_equal(rows[b, :, :, t], pool[table[b, t // 4], :, :, t % 4])


def test_rollout_config_validates_the_kv_cache_fields():
    RolloutConfig().validate()
    assert RolloutConfig().kv_cache == "paged"
    for bad, key in ((dict(kv_cache="ring"), "kv_cache"), (dict(page_size=0), "page_size"),
                     (dict(kv_cache_gib=0.0), "kv_cache_gib"),
                     (dict(paged_attention="magic"), "paged_attention")):
        with pytest.raises(ConfigError, match=f"rollout.{key}"):
            RolloutConfig(**bad).validate()


@pytest.fixture(scope="module")
def setup():
    arch = tiny_arch(128)
    model = tiny_model(arch, seed=0)
    rng = np.random.default_rng(1)
    # mixed lengths: one-token prompt, partial and whole pages of 8, two pages + a bit
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 1, 9, 17, 12, 33)]
    dense = SamplingEngine(model, kv_cache="dense", page_size=8, **KW)
    return arch, model, prompts, dense


def _same(a, b):
    """Bit for bit: tokens, lengths, finish reasons and float32 log-probs."""
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.finish_reasons == b.finish_reasons
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_dense_cache_is_whole_pages(setup):
    """The dense reference's rows are as long as a paged slot's gathered pages (cache_length
    rounds to the page size), so both attend over arrays of one length."""
    _, model, _, dense = setup
    assert dense.cache_length(33, NEW) == 96  # bucket 32 + 64, 12 pages of 8
    for kind in ("dense", "paged"):
        eng = SamplingEngine(model, kv_cache=kind, page_size=64, **KW)
        assert eng.cache_length(33, NEW) == 128, kind


@pytest.mark.parametrize("page", [8, 64])
def test_paged_greedy_equals_dense(setup, page):
    """Greedy, G = 2, a pool for every slot: the same tokens and float32 log-probs bit for
    bit. Page 64 pads the 96-position cache to 128 in both engines; before the dense rows
    were page-aligned and the prefill kept out of the insert's fusions, its log-probs
    differed from dense by up to 1.9e-6."""
    _, model, prompts, dense = setup
    if page != 8:
        dense = SamplingEngine(model, kv_cache="dense", page_size=page, **KW)
    sp = SamplingParams(n=2, max_new_tokens=NEW, temperature=0.0, seed=1)
    paged = SamplingEngine(model, kv_cache="paged", page_size=page, **KW)
    ref, got = dense.generate(model, prompts, sp), paged.generate(model, prompts, sp)
    _same(ref, got)
    assert paged.paged_stats.waits == 0 and paged.paged_stats.preemptions == 0
    assert (ref.lengths == NEW).all()


def test_paged_sampling_with_a_scarce_pool_equals_dense(setup):
    """Sampled, G = 3, stop ids (samples finish at different steps), a pool of ~10 pages per
    decode group for 4 slots whose samples need up to 9: samples wait and get preempted,
    and still give the dense engine's samples and log-probs bit for bit."""
    arch, model, prompts, dense = setup
    page_bytes = 8 * kv_bytes_per_token(arch, jnp.float32)
    paged = SamplingEngine(model, kv_cache="paged", page_size=8,
                           kv_cache_gib=21 * page_bytes / 2**30, **KW)
    ref, got = dense.generate(model, prompts, SAMPLED), paged.generate(model, prompts, SAMPLED)
    _same(ref, got)
    assert len(set(ref.lengths.tolist())) > 3 and "stop" in ref.finish_reasons
    st = paged.paged_stats
    assert st.waits > 0 and st.preemptions > 0, st
    assert st.peak_pages <= st.pool_pages


def test_pool_smaller_than_one_sample_fails_naming_the_budget(setup):
    arch, model, prompts, _ = setup
    page_bytes = 8 * kv_bytes_per_token(arch, jnp.float32)
    paged = SamplingEngine(model, kv_cache="paged", page_size=8,
                           kv_cache_gib=5 * page_bytes / 2**30, **KW)
    with pytest.raises(SamplingError, match=r"kv_cache_gib .* 4 pages .* prompt 5 \(33 tokens\)"):
        paged.generate(model, prompts, SAMPLED)
    with pytest.raises(SamplingError, match="kv_cache must be one of"):
        SamplingEngine(model, kv_cache="ring", **KW)
