"""The sampling flags that `sample`, `serve` and `eval` share: one definition of each flag's
type and help text; each command passes its own defaults (they differ on purpose: eval
samples like the paper, sample/serve default to plain sampling)."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

# --devices / --dtype values (resolved by flowrl_jax.sampling.devices; literal here so that
# `flowrl-jax --help` does not import JAX)
DEVICE_CHOICES = ("auto", "1", "all")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
KV_CACHE_CHOICES = ("paged", "dense")

# flag dest → (type, help). type None = an on/off switch (store_true, default False).
SAMPLING_FLAGS: dict[str, tuple[type | None, str | None]] = {
    "temperature": (float, "0 = greedy"),
    "top_p": (float, "nucleus sampling mass (1 = off)"),
    "top_k": (int, "0 = off"),
    "min_p": (float, "0 = off"),
    "max_new_tokens": (int, "most tokens generated per sample"),
    "seed": (int, "sampling seed"),
    "ignore_eos": (None, "do not stop at EOS"),
    "decode_slots": (int, "continuous-batching slots"),
    "decode_chunk": (int, "decode steps per device loop"),
}
# The flags that are fields of sampling.engine.SamplingParams.
PARAM_FLAGS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "seed", "ignore_eos")


def add_sampling_arguments(parser: argparse.ArgumentParser,
                           help: Mapping[str, str] | None = None, **defaults: Any) -> None:
    """Add the named sampling flags (`top_p=0.95` → `--top-p`, default 0.95) in the order
    given; `help` replaces a flag's shared help text for this command."""
    for dest, default in defaults.items():
        if dest not in SAMPLING_FLAGS:
            raise KeyError(f"add_sampling_arguments: unknown sampling flag {dest!r} "
                           f"(known: {', '.join(SAMPLING_FLAGS)})")
        kind, text = SAMPLING_FLAGS[dest]
        text = (help or {}).get(dest, text)
        flag = "--" + dest.replace("_", "-")
        if kind is None:
            if default is not False:
                raise ValueError(f"add_sampling_arguments: {flag} is a switch; "
                                 f"its default is False")
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields among the parsed flags (those the command registered)."""
    return {k: getattr(args, k) for k in PARAM_FLAGS if hasattr(args, k)}


def add_kv_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--kv-cache, --page-size and --kv-cache-gib (the engine's KV cache; rollout.* in configs)."""
    parser.add_argument("--kv-cache", default="paged", choices=KV_CACHE_CHOICES,
                        help="paged: a pool of pages shared by all samples (default); dense: "
                             "a full-length cache per slot (the reference)")
    parser.add_argument("--page-size", type=int, default=64, help="positions per KV page")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="KV page pool budget in GiB (default: 80%% of free device memory; "
                             "CPU: 4)")


def kv_cache_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingEngine KV-cache arguments among the parsed flags."""
    return {"kv_cache": args.kv_cache, "page_size": args.page_size,
            "kv_cache_gib": args.kv_cache_gib}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --devices, the same for sample, serve and eval (sampling/devices.py)."""
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="compute/KV-cache dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--devices", default="auto", choices=DEVICE_CHOICES,
                        help="devices to shard the model over (auto: all on GPU/TPU, 1 on CPU)")
