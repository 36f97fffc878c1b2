"""KV-cache arithmetic (kv_budget.py) against hand-computed cases, the paged-cache simulation
against hand-stepped runs, forced stops, and `bench rollout-memory`: its computed rows, its
errors, and the measured pair (the dense engine's allocated cache and peak active samples
agree with the computed row within 10 %)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from flowrl_jax import cli
from flowrl_jax.bench import forced_stops, rollout_memory
from flowrl_jax.bench.paged_sim import paged_capacity, simulate_paged
from flowrl_jax.config import preset_arch
from flowrl_jax.errors import ConfigError
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token, pages_for, pool_pages
from flowrl_jax.testing import tiny_arch

GIB = 2 ** 30


def test_kv_bytes_per_token_by_hand():
    # layers × kv heads × head_dim × (keys + values) × itemsize
    assert kv_bytes_per_token(preset_arch("qwen2.5-7b"), "bfloat16") == 28 * 4 * 128 * 2 * 2 == 57_344
    assert kv_bytes_per_token(preset_arch("qwen2.5-0.5b"), "bfloat16") == 24 * 2 * 64 * 2 * 2
    assert kv_bytes_per_token(preset_arch("qwen2.5-32b"), "bfloat16") == 64 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(preset_arch("qwen2.5-7b"), "float32") == 2 * 57_344


def test_pages_for_and_pool_pages_by_hand():
    assert [pages_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    arch = preset_arch("qwen2.5-7b")
    assert pool_pages(GIB, arch, "bfloat16", 16) == 1170  # 2^30 // (16 × 57,344) = 1170.3
    assert pool_pages(16 * 57_344 - 1, arch, "bfloat16", 16) == 0
    assert pool_pages(-1, arch, "bfloat16", 16) == 0 and pages_for(-3, 16) == 0
    with pytest.raises(ValueError, match="page_size"):
        pages_for(5, 0)
    with pytest.raises(ValueError, match="page_size"):
        pool_pages(GIB, arch, "bfloat16", 0)


def test_simulation_by_hand():
    # one prompt of 33 tokens: the prefill caches 32 positions = 2 full pages of 16, shared;
    # samples of 16 and 48 tokens, chunk 16, 2 slots.
    sim = simulate_paged([33], np.array([[16, 48]]), page_size=16, slots=2, chunk=16)
    # chunk 1: both reach 32 + 16 = 48 positions, 3 pages each, 1 own + 2 shared: 2 + 1 + 1
    # chunk 2: sample 2 at 64 positions: 2 own + 2 shared; chunk 3: 80 positions: 3 + 2
    assert sim.chunks == 3 and not sim.queued
    assert sim.peak_pages == 5 and sim.steady_pages_mean == pytest.approx((4 + 4 + 5) / 3)
    assert sim.steady_unshared_mean == pytest.approx((6 + 4 + 5) / 3)  # each its own 2 pages
    # one slot: the samples run one after the other, each with the prompt's 2 pages
    one = simulate_paged([33], np.array([[16, 48]]), page_size=16, slots=1, chunk=16)
    assert one.chunks == 4 and one.peak_pages == 5 and one.steady_running_mean == 1


def test_capacity_is_the_most_slots_that_fit():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 200, (12, 4))
    plens = rng.integers(2, 100, 12).tolist()
    pool = 60
    cap = paged_capacity(plens, lens, page_size=8, pool_pages=pool, chunk=8)
    assert cap.steady_pages_max <= pool
    worse = simulate_paged(plens, lens, page_size=8, slots=cap.slots + 1, chunk=8)
    assert worse.steady_pages_max > pool
    with pytest.raises(ConfigError, match="cannot run one sample"):
        paged_capacity(plens, lens, page_size=8, pool_pages=3, chunk=8)


def test_forced_stops_end_each_stream_at_its_target():
    rng = np.random.default_rng(0)
    streams = rng.permutation(10_000)[:6 * 40].reshape(6, 40)  # all tokens distinct
    targets = np.array([5, 40, 12, 1, 33, 20])
    stops, lens = forced_stops.forced_stops(streams, targets)
    assert lens.tolist() == targets.tolist() and len(stops) == 5  # 40: no stop needed
    # a token that also appears earlier elsewhere is not used: the next one back is
    streams[1, 3] = streams[0, 11]
    stops, lens = forced_stops.forced_stops(streams, np.array([12, 40, 40, 40, 40, 40]))
    assert lens.tolist() == [11, 40, 40, 40, 40, 40]
    assert forced_stops.padded((3,), 4, 100) == (3, 100, 101, 102)


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rollout_memory.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_computed_rows_dense_by_hand_and_paged_gain(tmp_path):
    args = _args(shapes="qwen2.5-7b", kv_budget_gib=20.0, prompts=64, no_measure=True)
    (row,) = rollout_memory.run(args)
    assert row["measured"] is False and row["kv_budget_gib"] == 20.0
    # dense: every slot reserves the 2,048 prompt bucket + 8,192 positions
    assert row["dense_bytes_per_sample"] == 10_240 * 57_344
    assert row["dense_concurrent"] == 20 * GIB // (10_240 * 57_344) == 36
    assert row["page_size"] == 64 and row["paged_pool_pages"] == 20 * GIB // (64 * 57_344)
    assert row["paged_limited_by"] == "memory" and row["paged_concurrent"] > 2 * 36
    assert 0.2 < row["prompt_sharing_saving"] < 0.5  # 31 prompt pages once instead of 8 times
    assert row["ours"] == row["paged_concurrent"] and row["reference"] == 36
    # all responses at the cap: paging gains only the prompt sharing
    f = tmp_path / "full.txt"
    f.write_text("8192\n" * 10)
    (full,) = rollout_memory.run(_args(shapes="qwen2.5-7b", kv_budget_gib=20.0, prompts=16,
                                       no_measure=True, lengths=str(f)))
    assert full["lengths"] == f"file {f}" and full["mean_response"] == 8192
    assert 36 <= full["paged_concurrent"] < 1.3 * 36


@pytest.mark.parametrize("text, culprit", [("12\n-3\n", "line 2"), ("12\nabc\n", "line 2"),
                                           ("[1, 2.5]", "item 1"), ("[1, 2", "not a valid JSON"),
                                           ("\n", "no lengths")])
def test_bad_lengths_file_is_one_line_naming_it(tmp_path, capsys, text, culprit):
    f = tmp_path / "lens.txt"
    f.write_text(text)
    assert cli.main(["bench", "rollout-memory", "--lengths", str(f), "--no-measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(f) in err and culprit in err
    assert cli.main(["bench", "rollout-memory", "--lengths", str(tmp_path / "no"), "--no-measure"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_json_lengths_file(tmp_path, capsys):
    f = tmp_path / "lens.json"
    f.write_text(json.dumps([100, 2000, 9000]))
    assert cli.main(["bench", "rollout-memory", "--json", "--no-measure", "--shapes",
                     "qwen2.5-0.5b", "--prompts", "4", "--lengths", str(f)]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    for key in ("shape", "kv_budget_gib", "dense_concurrent", "paged_concurrent", "measured"):
        assert key in row
    # 100, 2000, 8192 (capped), repeated over 4 × 8 samples
    assert row["mean_response"] == pytest.approx(np.mean(([100, 2000, 8192] * 11)[:32]), abs=0.1)


@pytest.mark.slow
def test_measured_pair_agrees_with_computed():
    small = dict(prompts=4, group=2, prompt_len=16, max_new=32, page_size=8, chunk=8,
                 dense_slots=2.5, buckets=(16,))
    computed, measured = rollout_memory.measured_pair(tiny_arch(4096), "tiny", small)
    assert (computed["measured"], measured["measured"]) == (False, True)
    assert computed["dense_concurrent"] == 2
    for key in ("dense_concurrent", "dense_bytes_per_sample", "paged_concurrent"):
        assert abs(measured[key] - computed[key]) <= 0.1 * computed[key], key
    assert measured["dense_cache_bytes"] <= computed["kv_budget_gib"] * GIB
    assert measured["dense_cache_bytes"] == 2 * computed["dense_bytes_per_sample"]
    assert computed["mean_response"] < 32  # the forced stops made lengths below the cap
    # the paged engine ran more samples at once than the dense one, in the computed pool
    # (+ its null page)
    assert measured["paged_concurrent"] > measured["dense_concurrent"]
    page_bytes = 8 * kv_bytes_per_token(tiny_arch(4096), "float32")  # page_size 8, 2 layers
    assert measured["paged_pool_bytes"] <= 1.1 * computed["paged_pool_pages"] * page_bytes + page_bytes