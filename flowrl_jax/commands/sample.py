"""`flowrl-jax sample`: generate text from a model (HF directory or Orbax checkpoint), or from a
running `flowrl-jax serve` server with `--server HOST:PORT`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowrl_jax.commands.common_args import (add_device_arguments, add_kv_cache_arguments,
                                             kv_cache_kwargs, add_sampling_arguments,
                                             sampling_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("source")
    src.add_argument("--model", help="HF model directory (with tokenizer files) or Orbax checkpoint")
    src.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="ask a running `flowrl-jax serve` (gRPC) instead of loading a model; "
                          "the sampling flags below travel with each request")
    pr = parser.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="one prompt")
    pr.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    add_sampling_arguments(parser, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                           max_new_tokens=256, seed=0, ignore_eos=False)
    parser.add_argument("--stop-token-ids", type=int, nargs="*", default=[],
                        help="extra token ids that end a sample")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample and line")
    add_sampling_arguments(parser, decode_slots=64, decode_chunk=32)
    add_device_arguments(parser)
    add_kv_cache_arguments(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from --prompt or --prompts-file (one per line, blank lines skipped)."""
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.exists():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts (one per line expected)")
    return prompts


def _emit(args: argparse.Namespace, rec: dict) -> None:
    if args.json:
        print(json.dumps(rec), flush=True)
    else:
        print(f"--- prompt {rec['prompt_index']} sample {rec['sample_index']} "
              f"({rec['finish_reason']}, {len(rec['token_ids'])} tokens)")
        print(rec["text"], flush=True)


def _run_server(args: argparse.Namespace, prompts: list[str]) -> int:
    """Ask a `flowrl-jax serve` over gRPC, with this command's sampling settings per request."""
    try:  # the serve extra (google-jetstream, grpcio)
        import grpc

        from flowrl_jax.sampling.jetstream_client import request_samples
    except ImportError as e:
        print(f"flowrl-jax sample: --server: {e}", file=sys.stderr)
        return 2

    settings = {k: v for k, v in sampling_kwargs(args).items() if k != "max_new_tokens"}
    # --chat: the server renders the prompt with its tokenizer's chat template
    settings.update(n=args.n, stop=list(args.stop_token_ids) or None, chat=args.chat)
    for i, p in enumerate(prompts):
        try:
            samples = request_samples(args.server, text=p, max_tokens=args.max_new_tokens,
                                      sampling=settings)
        except grpc.RpcError as e:
            print(f"flowrl-jax sample: --server {args.server}: {e.code().name}: {e.details()}",
                  file=sys.stderr)
            return 2
        for s, c in enumerate(samples):
            _emit(args, {"prompt_index": i, "sample_index": s, "token_ids": c.token_ids,
                         "text": c.text, "logprobs": None,
                         "finish_reason": "length" if len(c.token_ids) >= args.max_new_tokens
                         else "stop"})
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args)
    except (OSError, ValueError) as e:
        print(f"flowrl-jax sample: {e}", file=sys.stderr)
        return 2
    if args.server:
        return _run_server(args, prompts)
    if not args.model:
        print("flowrl-jax sample: give --model DIR (or --server HOST:PORT)", file=sys.stderr)
        return 2

    from flowrl_jax.checkpoint.load import load_for_sampling
    from flowrl_jax.config import ModelConfig
    from flowrl_jax.data.templates import ChatRenderer
    from flowrl_jax.data.tokenizer import load_tokenizer_for
    from flowrl_jax.sampling.devices import resolve_dtype, sampling_mesh
    from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams

    sampling = SamplingParams(**sampling_kwargs(args), n=args.n,
                              stop_token_ids=tuple(args.stop_token_ids))
    try:
        sampling.validate()
        mesh = sampling_mesh(args.devices)
        model, arch, tok_dir = load_for_sampling(
            args.model, mesh, ModelConfig(path=args.model, compute_dtype=resolve_dtype(args.dtype)))
        tokenizer = load_tokenizer_for(tok_dir)
    except (OSError, ValueError, KeyError, SamplingError) as e:
        print(f"flowrl-jax sample: {e}", file=sys.stderr)
        return 2
    if args.chat:
        chat = ChatRenderer(tokenizer)
        if not chat.enabled:
            print(f"flowrl-jax sample: --chat: the tokenizer ({tok_dir or 'packaged'}) has no chat "
                  "template", file=sys.stderr)
            return 2
        prompts = [chat(p) for p in prompts]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    eos = {t for t in (arch.eos_token_id, tokenizer.eos_token_id) if t is not None}
    engine = SamplingEngine(model, mesh=mesh, decode_slots=args.decode_slots, decode_chunk=args.decode_chunk,
                            prefill_buckets=(32, 128, 512, 2048), eos_token_ids=sorted(eos),
                            pad_token_id=tokenizer.pad_token_id or 0, **kv_cache_kwargs(args))
    try:
        out = engine.generate(model, ids, sampling)
    except SamplingError as e:
        print(f"flowrl-jax sample: {e}", file=sys.stderr)
        return 2
    for i in range(len(out.lengths)):
        n = int(out.lengths[i])
        toks = out.tokens[i, :n].tolist()
        _emit(args, {"prompt_index": int(out.prompt_index[i]), "sample_index": int(out.sample_index[i]),
                     "token_ids": toks, "text": tokenizer.decode(toks, skip_special_tokens=True),
                     "logprobs": [float(x) for x in out.logprobs[i, :n]],
                     "finish_reason": out.finish_reasons[i]})
    return 0
