"""`flowrl-jax bench sample`: generation tokens/s of our engine vs HF transformers `generate`
(PyTorch, same machine, same random weights, same lengths, sampling at T = 1 with no
truncation, EOS ignored so every sample runs to the same length). Each side reports the best
of at least `--repeats` timed runs after a warm-up, timing on for `--min-seconds` (CPU timings
on a shared machine are noisy); HF is timed with torch's default thread count and with 1
thread, and the faster one is reported.

`--rows long` (or `all`) adds the long-generation row set: the 0.5B shape, prompt 512, 1,024
new tokens, batch 32, samples stopping at different steps (stop tokens forced at lengths
drawn uniformly in [new/8, new], bench/forced_stops.py; an untimed run first finds them), the
engine's default decode chunk. Tokens/s counts the tokens generated; there is no HF side (its
samples would differ, hence its lengths). On CPU one long row takes several minutes.

Also reported: on CPU, the fraction of the measured matmul peak (big jnp matmul, same run)
that decoding reaches (2 × matmul params per token); on GPU/TPU, the fraction of the HBM
bandwidth roofline (params + KV cache bytes read per decode step ÷ step time ÷ peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from typing import Any

import numpy as np

from flowrl_jax.bench import add_dtype_argument, best_time, forced_stops, resolve_dtype
from flowrl_jax.config import RolloutConfig
from flowrl_jax.hardware import measured_matmul_flops, peak_hbm_bandwidth

#: the default shapes (any preset of configs/models can be named)
SHAPES = ("tiny", "qwen2.5-0.5b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--batches", default="1,8,32", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--no-reference", action="store_true", help="skip HF PyTorch")
    add_dtype_argument(parser, "weights, activations and KV cache (both sides)")
    parser.add_argument("--kv-cache", default="paged", choices=("paged", "dense"),
                        help="our engine's KV cache (dense: the reference engine)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per case and side at least; the best is reported (load noise)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="each side keeps timing a case until this much time has passed "
                             "(at most 200 runs): short cases get more than --repeats samples")
    parser.add_argument("--rows", choices=("standard", "long", "all"), default="standard",
                        help="standard: --shapes × --batches; long: the long-generation rows "
                             "(mixed stop lengths); all: both")
    parser.add_argument("--long-shape", default="qwen2.5-0.5b", help="shape of the long rows")
    parser.add_argument("--long-prompt-len", type=int, default=512, help="prompt tokens of the long rows")
    parser.add_argument("--long-new-tokens", type=int, default=1024, help="token cap of the long rows")
    parser.add_argument("--long-batch", type=int, default=32, help="samples of the long rows")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="sample from a model with its decoder layers scanned "
                             "(model.scan_layers=true, the default) or unrolled "
                             "(--no-scan-layers)")


def _arch(shape: str):
    import dataclasses

    from flowrl_jax.config import preset_arch
    from flowrl_jax.testing import tiny_arch

    if shape == "tiny":
        return tiny_arch(128)
    # no EOS: every sample runs to the same length on both sides
    return dataclasses.replace(preset_arch(shape, "bench sample --shapes"),
                               eos_token_id=None, bos_token_id=None)


def _ours(model, arch, batch: int, prompt_len: int, new: int, repeats: int = 1,
          progress=None, min_seconds: float = 0.0,
          kv_cache: str = "paged") -> tuple[float, float, float, int]:
    """(tokens/s, seconds per decode step, seconds of the first call: compile + one run,
    parallel decode groups the engine ran) of a warm engine, best of `repeats` runs or more
    (`best_time`)."""
    from flax import nnx

    from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams

    eng = SamplingEngine(model, decode_slots=batch, decode_chunk=new, prefill_buckets=(prompt_len,),
                         prefill_batch=batch, verbose=False, kv_cache=kv_cache)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, arch.vocab_size, prompt_len).tolist() for _ in range(batch)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True)
    params = nnx.state(model)  # what the trainer passes each rollout step
    t = time.perf_counter()
    eng.generate(params, prompts, sp)  # compile
    first = time.perf_counter() - t
    if progress is not None:
        progress(f"batch {batch}: compiled and ran once in {first:.1f}s")
    def run():
        out = eng.generate(params, prompts, sp)
        assert int(out.lengths.sum()) == batch * new

    dt = best_time(run, repeats, min_seconds)
    return batch * new / dt, dt / new, first, eng.decode_groups(eng.num_slots(batch), new)


def _reference_best(hf, arch, batch: int, prompt_len: int, new: int, repeats: int = 1,
                    min_seconds: float = 0.0) -> tuple[float, int]:
    """(tokens/s, torch threads) of HF at its best thread count: torch's default, and 1.

    On a small shared CPU, torch's OpenMP threads spin against other processes and HF can
    run 10-100x slower than single-threaded; the faster setting is the fair reference."""
    import torch

    default = torch.get_num_threads()
    if next(hf.parameters()).is_cuda:  # threads do not matter on a GPU
        return _reference(hf, arch, batch, prompt_len, new, repeats, min_seconds), default
    best = (-1.0, default)
    try:
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            best = max(best, (_reference(hf, arch, batch, prompt_len, new, repeats, min_seconds),
                              threads))
    finally:
        torch.set_num_threads(default)
    return best


def _reference(hf, arch, batch: int, prompt_len: int, new: int, repeats: int = 1,
               min_seconds: float = 0.0) -> float:
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, arch.vocab_size, (batch, prompt_len))).to(hf.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
              top_p=1.0, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        sync()

        def run():
            out = hf.generate(ids, **kw)
            sync()
            assert out.shape[1] == prompt_len + new

        dt = best_time(run, repeats, min_seconds)
    return batch * new / dt


def _long(model, arch, batch: int, prompt_len: int, new: int, repeats: int = 1,
          progress=None, min_seconds: float = 0.0) -> dict[str, Any]:
    """Tokens/s of a warm engine whose `batch` samples stop at different steps (forced stops
    at lengths drawn uniformly in [new/8, new]); the row's figures besides the shape."""
    from flax import nnx

    from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams

    chunk = RolloutConfig().decode_chunk
    eng = SamplingEngine(model, decode_slots=batch, decode_chunk=chunk,
                         prefill_buckets=(prompt_len,), prefill_batch=batch, verbose=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, arch.vocab_size, prompt_len).tolist() for _ in range(batch)]
    # stop arrays of one width for the probe and the timed runs: one compiled decode
    free = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True,
                          stop_token_ids=forced_stops.padded((), batch, arch.vocab_size))
    params = nnx.state(model)
    t = time.perf_counter()
    streams = eng.generate(params, prompts, free).tokens  # compiles; the full streams
    first = time.perf_counter() - t
    if progress is not None:
        progress(f"long batch {batch}: compiled and ran once in {first:.1f}s")
    targets = rng.integers(max(1, new // 8), new + 1, batch)
    stops, lens = forced_stops.forced_stops(streams, targets)
    sp = dataclasses.replace(free, stop_token_ids=forced_stops.padded(stops, batch, arch.vocab_size))

    def run():
        out = eng.generate(params, prompts, sp)
        assert np.array_equal(out.lengths, lens), "forced stops gave other lengths"

    dt = best_time(run, repeats, min_seconds)
    return {"ours": round(float(lens.sum()) / dt, 1), "ours_compile_s": round(first, 2),
            "generated_tokens": int(lens.sum()), "length_min": int(lens.min()),
            "length_median": int(np.median(lens)), "length_max": int(lens.max()),
            "decode_chunk": chunk}


def _progress(t0: float, what: str) -> None:
    """Where a long case spends its time (stderr; the JSON rows stay on stdout)."""
    print(f"[bench sample {time.perf_counter() - t0:7.1f}s] {what}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from flowrl_jax.models.qwen2 import Numerics, matmul_params
    from flowrl_jax.models.decode import cache_bytes
    from flowrl_jax.testing import tiny_model, to_hf

    which = getattr(args, "rows", "standard")
    shapes = ([s.strip() for s in args.shapes.split(",") if s.strip()]
              if which in ("standard", "all") else [])
    archs = {s: _arch(s) for s in shapes}  # unknown names fail here, before any compute
    long_arch = _arch(args.long_shape) if which in ("long", "all") else None
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), dev.platform)
    scan_layers = bool(getattr(args, "scan_layers", True))
    num = Numerics(param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype),
                   scan_layers=scan_layers)
    peak = measured_matmul_flops() if on_cpu else None
    bw = None if on_cpu else peak_hbm_bandwidth(dev.device_kind)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for shape in shapes:
        arch = archs[shape]
        model = tiny_model(arch, seed=0, scale=1.0 if shape != "tiny" else 10.0, num=num)
        _progress(t0, f"{shape}: model built")
        hf = None
        if not args.no_reference:
            import torch

            torch.manual_seed(0)
            hf = to_hf(model, arch)
            if torch.cuda.is_available():
                hf = hf.to("cuda", getattr(torch, dtype))
            _progress(t0, f"{shape}: HF copy built")
        for b in batches:
            reps = getattr(args, "repeats", 1)
            min_s = getattr(args, "min_seconds", 0.0)
            ours, step_s, first_s, groups = _ours(model, arch, b, args.prompt_len, args.new_tokens, reps,
                                          lambda what: _progress(t0, f"{shape} {what}"), min_s,
                                          getattr(args, "kv_cache", "paged"))
            _progress(t0, f"{shape} batch {b}: ours {ours:.1f} tokens/s")
            ref, ref_threads = (_reference_best(hf, arch, b, args.prompt_len, args.new_tokens, reps,
                                                min_s)
                                if hf is not None else (None, None))
            row: dict[str, Any] = {"shape": shape, "batch": b, "prompt_len": args.prompt_len,
                                   "new_tokens": args.new_tokens, "unit": "tokens/s",
                                   "ours": round(ours, 1),
                                   "reference": None if ref is None else round(ref, 1),
                                   "ratio": None if ref is None else round(ours / ref, 2),
                                   "reference_threads": ref_threads, "dtype": dtype,
                                   "ours_compile_s": round(first_s, 2),
                                   "ours_decode_groups": groups, "scan_layers": scan_layers,
                                   "device": dev.device_kind}
            if on_cpu:
                row["matmul_peak_gflops"] = round(peak / 1e9, 1)
                row["frac_matmul_peak"] = float(f"{2 * matmul_params(arch) * ours / peak:.3g}")
            elif bw is not None:
                avg_len = args.prompt_len + args.new_tokens / 2
                kv = cache_bytes(arch, b, int(avg_len), num.compute_dtype)
                from flax import nnx

                param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
                row["frac_hbm_roofline"] = float(f"{(param_bytes + kv) / step_s / bw:.3g}")
            rows.append(row)
            _progress(t0, "row " + ", ".join(f"{k}={row[k]}" for k in (
                "shape", "batch", "ours", "reference", "ratio", "frac_hbm_roofline") if k in row))
        del model, hf
        gc.collect()
    if long_arch is not None:
        model = tiny_model(long_arch, seed=0, scale=1.0 if args.long_shape != "tiny" else 10.0,
                           num=num)
        b, plen, new = args.long_batch, args.long_prompt_len, args.long_new_tokens
        figures = _long(model, long_arch, b, plen, new, getattr(args, "repeats", 1),
                        lambda what: _progress(t0, f"{args.long_shape} {what}"),
                        getattr(args, "min_seconds", 0.0))
        row = {"shape": args.long_shape, "rows": "long", "batch": b, "prompt_len": plen,
               "new_tokens": new, "unit": "tokens/s", **figures, "reference": None,
               "ratio": None, "dtype": dtype, "scan_layers": scan_layers,
               "device": dev.device_kind}
        rows.append(row)
        _progress(t0, f"long row: {row['ours']} tokens/s, lengths {row['length_min']}.."
                      f"{row['length_max']}")
    return rows
