"""`flowrl-jax serve --model DIR [--port 9000]`: serve a model through JetStream's gRPC server."""

from __future__ import annotations

import argparse
import sys

from flowrl_jax.commands.common_args import add_sampling_arguments, sampling_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind ([::] for all)")
    parser.add_argument("--port", type=int, default=9000, help="gRPC port (0 = pick a free one)")
    parser.add_argument("--slots", type=int, default=8, help="concurrent decodes")
    parser.add_argument("--max-prefill-length", type=int, default=1024,
                        help="longest prompt accepted (rounded up to a power of two >= 16)")
    add_sampling_arguments(parser, help={"max_new_tokens": "per-request limit"},
                           max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                           seed=0, ignore_eos=False)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def run(args: argparse.Namespace) -> int:
    from flowrl_jax.config import ModelConfig
    from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
    from flowrl_jax.checkpoint.load import load_for_sampling
    from flowrl_jax.data.tokenizer import load_tokenizer_for

    try:
        from flowrl_jax.sampling.jetstream import FlowRLEngine, start_server
    except ImportError as e:
        print(f"flowrl-jax serve: {e}", file=sys.stderr)
        return 2
    sampling = SamplingParams(**sampling_kwargs(args))
    try:
        model, arch, tok_dir = load_for_sampling(
            args.model, None, ModelConfig(path=args.model, compute_dtype=args.dtype))
        tokenizer = load_tokenizer_for(tok_dir)
        eos = {t for t in (arch.eos_token_id, tokenizer.eos_token_id) if t is not None}
        core = SamplingEngine(model, decode_slots=args.slots, eos_token_ids=sorted(eos),
                              prefill_buckets=(16, 64, 256, 1024))
        engine = FlowRLEngine(core, model, tokenizer, tok_dir or "packaged", sampling,
                              max_prefill_length=args.max_prefill_length, slots=args.slots)
        server = start_server(engine, host=args.host, port=args.port)
    except (OSError, ValueError, KeyError, SamplingError) as e:
        print(f"flowrl-jax serve: {e}", file=sys.stderr)
        return 2
    print(f"flowrl-jax serve: listening on {args.host}:{server.port} ({args.slots} slots, "
          f"max prompt {engine.max_prefill_length}, max new tokens {args.max_new_tokens})",
          file=sys.stderr, flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0
