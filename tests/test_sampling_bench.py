"""`bench sample` plumbing: FLOP/bandwidth helpers against independent counts, and one tiny
case end to end (row contract: ours, reference, ratio = ours ÷ reference)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from flax import nnx

from flowrl_jax.bench import sample as bench
from flowrl_jax.config import ModelArch
from flowrl_jax.models.qwen2 import Numerics, abstract_model, matmul_params


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unrolled"])
def test_matmul_params_counts_every_kernel(scanned):
    arch = ModelArch()  # Qwen2.5-0.5B shape
    state = nnx.state(abstract_model(arch, Numerics(scan_layers=scanned)), nnx.Param)
    # a kernel is 2-D per layer: stacked layers add the leading `layers` axis
    kernels = sum(int(np.prod(v.get_value().shape)) for path, v in nnx.to_flat_state(state)
                  if v.get_value().ndim == 2 + (scanned and path[:2] == ("layers", "stacked")))
    # 2-D params = all linear kernels + the (tied) embedding, which is also the LM head
    assert matmul_params(arch) == kernels
    assert 480e6 < matmul_params(arch) < 500e6  # Qwen2.5-0.5B: 494M parameters


def test_peak_bandwidth_table():
    assert bench.peak_hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_hbm_bandwidth("TPU v5 lite") == 8.19e11
    assert bench.peak_hbm_bandwidth("cpu") is None


def test_bench_tiny_case():
    args = argparse.Namespace(shapes="tiny", batches="2", new_tokens=4, prompt_len=8,
                              no_reference=False)
    rows = bench.run(args)
    assert len(rows) == 1
    r = rows[0]
    assert r["shape"] == "tiny" and r["batch"] == 2 and r["ours"] > 0 and r["reference"] > 0
    assert abs(r["ratio"] - r["ours"] / r["reference"]) < 0.01 * r["ratio"] + 0.01
    assert 0 < r["frac_matmul_peak"] < 1
    assert r["dtype"] == "float32"  # "auto" on CPU
    # the first call compiles: it takes longer than a warm one (2 × 4 tokens at `ours` tokens/s)
    assert r["ours_compile_s"] > 8 / r["ours"]
    assert r["ours_decode_groups"] == 1  # 2 slots: one loop
    assert r["scan_layers"] is True  # scanned (the config default) unless --no-scan-layers


def test_any_preset_is_a_shape_and_runs_to_full_length():
    from flowrl_jax.config import ConfigError

    arch = bench._arch("qwen2.5-1.5b")
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_key_value_heads) == (1536, 28, 2)
    assert arch.eos_token_id is None and arch.bos_token_id is None  # no early stop on either side
    with pytest.raises(ConfigError, match="'huge'"):
        bench.run(argparse.Namespace(shapes="tiny,huge", batches="1", new_tokens=1, prompt_len=4,
                                     no_reference=True))


def test_best_time_runs_at_least_repeats_and_until_min_seconds():
    import itertools
    import time

    from flowrl_jax.bench import best_time

    durations = itertools.cycle([0.004, 0.001, 0.003])
    took = []

    def run():
        t = time.perf_counter()
        time.sleep(next(durations))
        took.append(time.perf_counter() - t)

    best = best_time(run, repeats=3)
    assert len(took) == 3 and best <= min(took) + 1e-3  # the fastest of exactly 3 (its own timer)
    took.clear()
    best_time(run, repeats=2, min_seconds=0.05)
    # it stopped at the first run that brought the total to 0.05 s
    assert len(took) > 2 and sum(took[:-1]) < 0.05 <= sum(took) + 1e-3
    took.clear()
    best_time(run, repeats=1, min_seconds=10.0, max_runs=5)
    assert len(took) == 5


def test_long_rows_stop_at_mixed_lengths_and_leave_standard_rows_alone():
    args = argparse.Namespace(shapes="tiny", batches="2", new_tokens=4, prompt_len=8,
                              no_reference=True, rows="long", long_shape="tiny",
                              long_prompt_len=8, long_new_tokens=48, long_batch=6)
    rows = bench.run(args)
    assert len(rows) == 1  # no standard rows
    r = rows[0]
    assert (r["rows"], r["shape"], r["batch"], r["new_tokens"]) == ("long", "tiny", 6, 48)
    assert r["ours"] > 0 and r["reference"] is None
    # the forced stops end samples at different steps (the run asserts the exact lengths)
    assert 1 <= r["length_min"] < r["length_max"] <= 48
    assert r["generated_tokens"] < 6 * 48
