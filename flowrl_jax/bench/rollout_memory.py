"""`flowrl-jax bench rollout-memory`: how many rollout samples a KV-cache budget holds at
once, dense (each slot reserves prompt + max_new positions, today's engine) against paged
(pages in use at steady state, paged_sim.py, the prompt's full pages shared by its G samples).

Computed rows: the paper's recipe (512 prompts × G = 8, prompts at the 2,048-token cap, the
worst case for paging, responses capped at 8,192) for each shape, response lengths log-normal
(median 1,500, σ 1.0, capped, seeded) or read from `--lengths FILE`. The dense reservation is
the engine's own cache (`empty_cache` through jax.eval_shape: nothing allocated); pages come
from kv_budget.py. The budget defaults to what an 80 GiB device holds beside the bf16 weights
(90 % of the rest). `ours` = paged_concurrent, `reference` = dense_concurrent.

The measured pair (`case` cpu-small; `--no-measure` skips it): the 0.5B shape cut to 2 layers,
8 prompts of 64 tokens × G = 4, 64 new tokens, float32, a budget of 8.5 dense slots. It is
computed like the recipe rows, then run on this machine (memory_probe.py): the dense engine's
cache arrays and peak active slots; the paged engine's pool arrays and peak active slots, run
with the computed pool and slot count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowrl_jax.bench import forced_stops, memory_probe
from flowrl_jax.bench.paged_sim import PagedSim, paged_capacity
from flowrl_jax.config import ModelArch, RolloutConfig, preset_arch
from flowrl_jax.errors import ConfigError
from flowrl_jax.models.decode import empty_cache
from flowrl_jax.models.qwen2 import matmul_params
from flowrl_jax.sampling.kernels import bucket
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token, pages_for, pool_pages
from flowrl_jax.sampling.params import SamplingParams
from flowrl_jax.testing import tiny_model

SHAPES = ("qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b")
DEVICE_GIB = 80.0  # the default budget's device: an 80 GiB H100/A100
GIB = 2 ** 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rc = RolloutConfig()
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of model presets")
    parser.add_argument("--kv-budget-gib", type=float, default=None,
                        help="KV-cache budget for every shape (default: 90%% of what an 80 GiB "
                             "device leaves beside the shape's bf16 weights)")
    parser.add_argument("--page-size", type=int, default=64,
                        help="positions per page (the paged engine's rollout.page_size default)")
    parser.add_argument("--lengths", default=None, metavar="FILE",
                        help="response lengths, one int per line or a JSON list (instead of "
                             "the log-normal draw); taken in order, repeated to fill the batch")
    parser.add_argument("--prompts", type=int, default=rc.prompts_per_step, help="prompts per step")
    parser.add_argument("--group", type=int, default=rc.samples_per_prompt, help="samples per prompt (G)")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens (all prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=rc.max_new_tokens,
                        help="response cap (dense slots reserve it)")
    parser.add_argument("--median", type=float, default=1500.0, help="median of the log-normal lengths")
    parser.add_argument("--sigma", type=float, default=1.0, help="σ of the log-normal lengths")
    parser.add_argument("--seed", type=int, default=0, help="seed of the length draw")
    parser.add_argument("--chunk", type=int, default=rc.decode_chunk,
                        help="decode steps between slot refills (rollout.decode_chunk)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="KV-cache dtype of the computed rows")
    parser.add_argument("--no-measure", action="store_true", help="skip the measured CPU pair")


# --------------------------------------------------------------------------- lengths


def draw_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> np.ndarray:
    """`n` response lengths: log-normal with this median and σ, rounded, clipped to [1, cap]."""
    rng = np.random.default_rng(seed)
    x = np.exp(math.log(median) + sigma * rng.standard_normal(n))
    return np.clip(np.round(x), 1, cap).astype(np.int64)


def read_lengths(path: str) -> np.ndarray:
    """Response lengths from `path`: a JSON list, or one integer per line (blank lines
    ignored); every one >= 1. Errors name the file (and line)."""
    try:
        text = open(path).read()
    except OSError as e:
        raise ConfigError(f"--lengths {path}: cannot read it ({e.strerror})") from None
    if text.lstrip().startswith("["):
        try:
            vals = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lengths {path}: not a valid JSON list ({e.msg}, line {e.lineno})") from None
        where = [f"item {i}" for i in range(len(vals))]
    else:
        vals, where = [], []
        for no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                vals.append(line.strip())
                where.append(f"line {no}")
    out = []
    for v, w in zip(vals, where):
        try:
            n = int(v) if not isinstance(v, (float, bool)) else None
        except (TypeError, ValueError):
            n = None
        if n is None or n < 1:
            raise ConfigError(f"--lengths {path}: {w} is {v!r}, not a positive integer")
        out.append(n)
    if not out:
        raise ConfigError(f"--lengths {path}: no lengths in the file")
    return np.asarray(out, np.int64)


def batch_lengths(lengths: np.ndarray, prompts: int, group: int, cap: int) -> np.ndarray:
    """[prompts, group] lengths: `lengths` in order, repeated to fill, capped at `cap`."""
    reps = -(-prompts * group // len(lengths))
    return np.minimum(np.tile(lengths, reps)[:prompts * group], cap).reshape(prompts, group)


# --------------------------------------------------------------------------- sizes


def dense_slot(arch: ModelArch, dtype: Any, prompt_len: int, max_new: int,
               buckets: Sequence[int], page_size: int) -> tuple[int, int]:
    """(positions, bytes) one dense slot reserves: `SamplingEngine.cache_length` positions
    (whole pages of `page_size`), bytes of `empty_cache` for one slot through
    jax.eval_shape (nothing allocated)."""
    length = bucket(max(1, prompt_len - 1), tuple(sorted(buckets))) + -(-max_new // 32) * 32
    length = pages_for(length, page_size) * page_size
    shapes = jax.eval_shape(lambda: empty_cache(arch, 1, length, jnp.dtype(dtype)))
    return length, sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def default_budget_bytes(arch: ModelArch) -> int:
    """90 % of what an 80 GiB device leaves beside the bf16 weights (untied heads counted
    twice: embedding and LM head); at least one GiB."""
    params = matmul_params(arch) + (0 if arch.tie_word_embeddings else arch.hidden_size * arch.vocab_size)
    return int(max(GIB, 0.9 * (DEVICE_GIB * GIB - 2 * params)))


def computed_row(shape: str, arch: ModelArch, dtype: Any, budget: int, page_size: int,
                 chunk: int, prompt_len: int, lens: np.ndarray, max_new: int,
                 buckets: Sequence[int], lengths_from: str) -> tuple[dict, PagedSim]:
    """One row: dense vs paged concurrency in `budget` bytes for `lens` [prompts, G]."""
    per_token = kv_bytes_per_token(arch, dtype)
    slot_positions, slot_bytes = dense_slot(arch, dtype, prompt_len, max_new, buckets, page_size)
    dense = budget // slot_bytes
    pages = pool_pages(budget, arch, dtype, page_size)
    page_bytes = page_size * per_token
    sim = paged_capacity([prompt_len] * lens.shape[0], lens, page_size, pages, chunk)
    paged = sim.slots
    saving = 1.0 - sim.steady_pages_mean / sim.steady_unshared_mean
    row = {"shape": shape, "case": "recipe", "measured": False, "layers": arch.num_hidden_layers,
           "dtype": str(jnp.dtype(dtype)), "kv_budget_gib": round(budget / GIB, 4),
           "prompts": lens.shape[0], "group": lens.shape[1], "prompt_len": prompt_len,
           "max_new_tokens": max_new, "lengths": lengths_from,
           "mean_response": round(float(lens.mean()), 1), "page_size": page_size, "chunk": chunk,
           "kv_bytes_per_token": per_token, "dense_positions_per_sample": slot_positions,
           "dense_bytes_per_sample": slot_bytes, "dense_concurrent": int(dense),
           "paged_pool_pages": pages, "paged_pool_bytes": pages * page_bytes,
           "paged_bytes_per_sample": int(sim.steady_pages_mean * page_bytes / sim.steady_running_mean),
           "paged_concurrent": int(paged),
           "paged_limited_by": "memory" if paged < lens.size else "batch",
           "prompt_sharing_saving": round(saving, 4),
           "prompt_sharing_saved_gib": round((sim.steady_unshared_mean - sim.steady_pages_mean)
                                             * page_bytes / GIB, 3),
           "ours": int(paged), "reference": int(dense), "unit": "concurrent samples",
           "ratio": round(paged / dense, 2) if dense else None}
    return row, sim


# --------------------------------------------------------------------------- measured pair

#: the measured pair's settings (stated in the rows): small enough for a CPU run
SMALL = dict(layers=2, prompts=8, group=4, prompt_len=64, max_new=64, page_size=16, chunk=16,
             dense_slots=8.5, dtype="float32", buckets=(64,))


def measured_pair(arch: ModelArch, shape: str, small: Optional[dict] = None,
                  seed: int = 0) -> list[dict]:
    """[computed, measured] rows of `shape` cut to `small`'s settings: response lengths
    log-normal at the recipe's median scaled to the cap, forced by stop tokens
    (forced_stops.py), the same for both rows."""
    s = {**SMALL, **(small or {})}
    arch = dataclasses.replace(arch, num_hidden_layers=s["layers"], eos_token_id=None,
                               bos_token_id=None)
    model = tiny_model(arch, seed=0, scale=1.0)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, arch.vocab_size, s["prompt_len"]).tolist() for _ in range(s["prompts"])]
    n = s["prompts"] * s["group"]
    slot_bytes = dense_slot(arch, s["dtype"], s["prompt_len"], s["max_new"], s["buckets"],
                            s["page_size"])[1]
    budget = int(s["dense_slots"] * slot_bytes)
    slots = budget // slot_bytes
    # the streams without stops, then stops at drawn lengths; both runs on `slots` slots with
    # stop arrays of one width, so the engine compiles once
    free = SamplingParams(temperature=1.0, max_new_tokens=s["max_new"], n=s["group"],
                          seed=seed, ignore_eos=True,
                          stop_token_ids=forced_stops.padded((), n, arch.vocab_size))
    eng = memory_probe.dense_engine(model, slots=slots, decode_chunk=s["chunk"],
                                    prefill_buckets=s["buckets"], page_size=s["page_size"])
    streams = memory_probe.measure(eng, model, prompts, free).tokens
    targets = draw_lengths(n, 1500 * s["max_new"] / 8192, 1.0, s["max_new"], seed)
    stops, lens = forced_stops.forced_stops(streams, targets)
    sampling = dataclasses.replace(free, stop_token_ids=forced_stops.padded(stops, n, arch.vocab_size))
    row, sim = computed_row(shape, arch, s["dtype"], budget, s["page_size"], s["chunk"],
                            s["prompt_len"], lens.reshape(s["prompts"], s["group"]), s["max_new"],
                            s["buckets"], f"forced stops at log-normal draws (seed {seed})")
    row["case"] = "cpu-small"
    dense = memory_probe.measure(eng, model, prompts, sampling)
    if not np.array_equal(dense.lengths, lens):
        raise RuntimeError("the forced stops did not give the predicted lengths")
    meas = {**row, "measured": True, "dense_concurrent": dense.peak_running,
            "dense_bytes_per_sample": dense.cache_bytes // max(dense.slots, 1),
            "dense_cache_bytes": dense.cache_bytes, "reference": dense.peak_running,
            "paged_bytes_per_sample": None, "prompt_sharing_saving": None,
            "prompt_sharing_saved_gib": None}
    paged_eng = memory_probe.paged_engine(model, page_size=s["page_size"],
                                          pool_pages=row["paged_pool_pages"],
                                          decode_slots=sim.slots, decode_chunk=s["chunk"],
                                          prefill_buckets=s["buckets"])
    paged = memory_probe.measure(paged_eng, model, prompts, sampling)
    if not np.array_equal(paged.lengths, lens):
        raise RuntimeError("the paged engine's samples differ from the dense engine's")
    meas.update(paged_concurrent=paged.peak_running, ours=paged.peak_running,
                paged_pool_bytes=paged.cache_bytes,
                ratio=round(paged.peak_running / max(dense.peak_running, 1), 2))
    return [row, meas]


# --------------------------------------------------------------------------- the bench


def run(args: argparse.Namespace) -> list[dict]:
    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    archs = {x: preset_arch(x, "bench rollout-memory --shapes") for x in shapes}
    buckets = RolloutConfig().prefill_buckets
    if args.prompt_len < 1 or args.prompt_len > max(buckets):
        raise ConfigError(f"--prompt-len {args.prompt_len}: must be in 1..{max(buckets)} "
                          "(the largest prefill bucket)")
    if args.lengths:
        raw, source = read_lengths(args.lengths), f"file {args.lengths}"
    else:
        raw = draw_lengths(args.prompts * args.group, args.median, args.sigma,
                           args.max_new_tokens, args.seed)
        source = (f"log-normal(median={args.median:g}, sigma={args.sigma:g}, "
                  f"cap={args.max_new_tokens}, seed={args.seed})")
    lens = batch_lengths(raw, args.prompts, args.group, args.max_new_tokens)
    rows = []
    for shape in shapes:
        arch = archs[shape]
        budget = (default_budget_bytes(arch) if args.kv_budget_gib is None
                  else int(args.kv_budget_gib * GIB))
        rows.append(computed_row(shape, arch, args.dtype, budget, args.page_size, args.chunk,
                                 args.prompt_len, lens, args.max_new_tokens, buckets, source)[0])
    if not args.no_measure:
        rows += measured_pair(preset_arch("qwen2.5-0.5b"), "qwen2.5-0.5b")
    return rows
