"""`flowrl-jax serve --model DIR [--port 9000] [--http-port H]`: serve a model through
JetStream's gRPC server and, with --http-port, an OpenAI-compatible HTTP endpoint beside it
(`/v1/completions`, `/v1/chat/completions`, `/v1/models`; the model's id is its directory name)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowrl_jax.commands.common_args import (add_device_arguments, add_kv_cache_arguments,
                                             kv_cache_kwargs, add_sampling_arguments,
                                             sampling_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind ([::] for all)")
    parser.add_argument("--port", type=int, default=9000, help="gRPC port (0 = pick a free one)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API on this port "
                             "(0 = pick a free one; default: off)")
    parser.add_argument("--slots", type=int, default=8, help="concurrent decodes")
    parser.add_argument("--max-prefill-length", type=int, default=1024,
                        help="longest prompt accepted (rounded up to a power of two >= 16)")
    add_sampling_arguments(parser, help={"max_new_tokens": "per-request limit",
                                         "temperature": "default temperature (0 = greedy); "
                                                        "requests may set their own"},
                           max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                           seed=0, ignore_eos=False)
    add_device_arguments(parser)
    add_kv_cache_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from flowrl_jax.checkpoint.hf import load_hf_state, read_arch
    from flowrl_jax.checkpoint.load import load_for_sampling
    from flowrl_jax.config import ModelConfig
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.data.tokenizer import load_tokenizer_for
    from flowrl_jax.sampling.completions import CompletionService
    from flowrl_jax.sampling.devices import resolve_dtype, sampling_mesh
    from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
    from flowrl_jax.sampling.openai_http import OpenAIApp, start_http_server
    from flowrl_jax.sampling.rollout_server import RolloutService

    try:
        from flowrl_jax.sampling.jetstream import FlowRLEngine
        from flowrl_jax.sampling.jetstream_server import start_server
    except ImportError as e:
        print(f"flowrl-jax serve: {e}", file=sys.stderr)
        return 2
    sampling = SamplingParams(**sampling_kwargs(args))
    http = None
    try:
        sampling.validate()
        dtype = resolve_dtype(args.dtype)
        mesh = sampling_mesh(args.devices)
        model_cfg = ModelConfig(path=args.model, compute_dtype=dtype)
        model, arch, tok_dir = load_for_sampling(args.model, mesh, model_cfg)
        tokenizer = load_tokenizer_for(tok_dir)
        eos = {t for t in (arch.eos_token_id, tokenizer.eos_token_id) if t is not None}
        core = SamplingEngine(model, mesh=mesh, decode_slots=args.slots,
                              eos_token_ids=sorted(eos), prefill_buckets=(16, 64, 256, 1024),
                              pad_token_id=tokenizer.pad_token_id or 0, verbose=False,
                              **kv_cache_kwargs(args))
        engine = FlowRLEngine(core, model, tokenizer, tok_dir or "packaged", sampling,
                              max_prefill_length=args.max_prefill_length, slots=args.slots)
        service = CompletionService(core, model, tokenizer, sampling,
                                    max_new_tokens_limit=args.max_new_tokens)
        # a trainer's pushed policy (rollout.servers): a HF directory on shared storage, read
        # in this server's numerics and placement
        numerics = Numerics.from_config(model_cfg)
        rollouts = RolloutService(service, read_arch,
                                  lambda path: load_hf_state(path, mesh, numerics)[1],
                                  engine.set_params)
        if args.http_port is not None:  # bound first: a busy port fails before gRPC starts
            model_id = Path(args.model).resolve().name
            http = start_http_server(OpenAIApp(service, model_id), host=args.host,
                                     port=args.http_port)
        server = start_server(engine, host=args.host, port=args.port, service=service,
                              rollouts=rollouts)
    except (OSError, ValueError, KeyError, SamplingError) as e:
        if http is not None:
            http.stop()
        print(f"flowrl-jax serve: {e}", file=sys.stderr)
        return 2
    print(f"flowrl-jax serve: listening on {args.host}:{server.port} ({args.slots} slots, "
          f"max prompt {engine.max_prefill_length}, max new tokens {args.max_new_tokens}, "
          f"{dtype}, {mesh.devices.size} device(s))", file=sys.stderr, flush=True)
    if http is not None:
        print(f"flowrl-jax serve: OpenAI-compatible API on http://{args.host}:{http.port}/v1 "
              f"(model {model_id!r})", file=sys.stderr, flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    except SamplingError as e:  # a driver thread failed: the server cannot serve any more
        print(f"flowrl-jax serve: {e}", file=sys.stderr)
        return 1
    finally:
        if http is not None:
            http.stop()
    return 0
