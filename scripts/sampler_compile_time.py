"""Count and time the sampler's compiled programs at a real shape (issue 19): lower + compile
each program the engine builds for prompts up to --prompt tokens and --new new tokens, on
abstract weights (nothing allocated, no checkpoint needed).

    PYTHONPATH=. .venv/bin/python scripts/sampler_compile_time.py --kv-cache paged
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flowrl_jax.config import preset_arch
from flowrl_jax.models.qwen2 import Numerics, abstract_model
from flowrl_jax.sampling.engine import MAX_STOP_IDS, SamplingEngine, SamplingParams
from flowrl_jax.sampling.kernels import bucket, pow2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=8192)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--kv-cache", default="paged", choices=("paged", "dense"))
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode-only", action="store_true", help="skip the admit programs")
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype)
    model = abstract_model(preset_arch(args.preset), Numerics(dt, dt))
    eng = SamplingEngine(model, decode_slots=args.slots, decode_chunk=args.chunk,
                         kv_cache=args.kv_cache, page_size=args.page_size, verbose=False)
    params = nnx.state(model)
    slots, length = args.slots, eng.cache_length(args.prompt, args.new)
    kern = eng.kernels
    if args.kv_cache == "paged":
        st = kern.abstract_state(slots, length, eng.pool_pages(slots, length))
    else:
        st = kern.abstract_state(slots, length)
    i32 = jax.ShapeDtypeStruct((slots,), jnp.int32)
    bb = min(eng.prefill_batch, pow2(slots))
    spec = eng.spec_for(SamplingParams(temperature=1.0, max_new_tokens=args.new))
    stops = jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32)
    programs = [("decode_chunk", lambda: kern.decode_chunk_jit.lower(params, st, stops, spec,
                                                                      args.chunk))]
    # one admit (prefill + insert) program per prefill bucket a prompt up to --prompt can use
    top = bucket(args.prompt - 1, eng.prefill_buckets)
    for pb in [] if args.decode_only else [b for b in eng.prefill_buckets if b <= top]:
        tok = jax.ShapeDtypeStruct((bb, pb), jnp.int32)
        programs.append((f"admit[{pb}]", lambda tok=tok: kern.admit_jit.lower(
            params, st, tok, jax.ShapeDtypeStruct((bb,), jnp.int32), i32, i32, i32, i32,
            jax.ShapeDtypeStruct((), jnp.uint32), i32, i32)))
    print(f"{args.preset} {args.kv_cache}: {slots} slots × {length} positions, chunk "
          f"{args.chunk}, {dt.name}; state {sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st)) / 2**30:.2f} GiB")
    total = 0.0
    for name, lower in programs:
        t0 = time.perf_counter()
        lowered = lower()
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        total += t2 - t0
        print(f"  {name}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s", flush=True)
    print(f"  {len(programs)} programs (+ the state initialiser): {total:.1f} s in all")


if __name__ == "__main__":
    main()
