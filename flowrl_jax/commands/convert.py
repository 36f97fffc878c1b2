"""`flowrl-jax convert hf-to-orbax | orbax-to-hf`: move checkpoints to and from HF format.

Every argument is checked before anything is read or written; bad input is one line naming the
flag (exit 2), and a failed export leaves no partial HF directory (checkpoint/hf.py stages it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flowrl_jax.checkpoint.safetensors_io import parse_size
from flowrl_jax.errors import ConfigError
from flowrl_jax.paths import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    p = sub.add_parser("hf-to-orbax", help="HF directory (config.json + safetensors) → Orbax checkpoint")
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: the checkpoint's own dtype)")
    p.add_argument("--step", type=int, default=0, help="step number to save under (default 0)")
    q = sub.add_parser("orbax-to-hf", help="Orbax checkpoint (or RUN/checkpoints) → HF directory")
    q.add_argument("--ckpt", required=True, help="Orbax checkpoint dir, RUN/checkpoints or RUN")
    q.add_argument("--out", required=True, help="HF directory to write")
    q.add_argument("--tokenizer", default=None,
                   help="tokenizer dir to copy (default: the checkpoint's own tokenizer/, if any)")
    q.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    q.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the written tensors (default: the parameters' dtype)")
    q.add_argument("--shard-size", default="5GB", help="max safetensors shard size (default 5GB)")


def _summary(what: str, params: int, nbytes: int, dtype: str, seconds: float, out: Path) -> str:
    mb = nbytes / 1e6
    return (f"{what}: {params:,} params, {dtype}, {mb:,.2f} MB in {seconds:.2f} s "
            f"({mb / max(seconds, 1e-9):,.1f} MB/s) → {out}")


def _hf_to_orbax(args: argparse.Namespace) -> int:
    import jax

    from flowrl_jax.checkpoint import hf, orbax
    from flowrl_jax.mesh import make_mesh
    from flowrl_jax.models.arch import param_count
    from flowrl_jax.models.qwen2 import Numerics, dtype_of

    t0 = time.perf_counter()
    dtype = args.dtype or hf.checkpoint_dtype(args.hf)
    num = Numerics(param_dtype=dtype_of(dtype), compute_dtype=dtype_of(dtype))
    model, arch = hf.load_hf(args.hf, make_mesh(), num)
    t_load = time.perf_counter() - t0
    tok = Path(args.hf) if hf.has_tokenizer(args.hf) else None
    orbax.save_policy(args.out, model, arch, step=args.step, param_dtype=dtype, tokenizer_dir=tok)
    secs = time.perf_counter() - t0
    n = param_count(arch)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model))
    print(_summary("hf-to-orbax", n, nbytes, dtype, secs, Path(args.out)))
    print(f"  read+place {t_load:.2f} s, save {secs - t_load:.2f} s, step {args.step}"
          + (", tokenizer copied" if tok else ", no tokenizer files in the HF dir"))
    return 0


def _orbax_to_hf(args: argparse.Namespace) -> int:
    from flowrl_jax.checkpoint import hf, orbax
    from flowrl_jax.mesh import make_mesh

    t0 = time.perf_counter()
    ckpt = orbax.resolve_checkpoint_dir(args.ckpt)
    graphdef, state, arch, step = orbax.restore_policy_state(ckpt, make_mesh(), None, args.step)
    t_load = time.perf_counter() - t0
    tok = args.tokenizer or orbax.checkpoint_tokenizer_dir(ckpt)
    s = hf.export_hf(state, arch, args.out, dtype=args.dtype, shard_size=args.shard_size,
                     tokenizer_dir=tok)
    secs = time.perf_counter() - t0
    print(_summary("orbax-to-hf", s.params, s.bytes, s.dtype, secs, s.out_dir))
    print(f"  step {step} of {ckpt}; restore {t_load:.2f} s, write {s.seconds:.2f} s; "
          f"{len(s.files)} safetensors file(s)" + (f"; tokenizer from {tok}" if tok else
                                                    "; no tokenizer copied (use --tokenizer)"))
    return 0


def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the flag for any argument that cannot work (nothing touched yet)."""
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step: must be >= 0, got {args.step}")
    check_output_dir(args.out)
    if args.direction == "orbax-to-hf":
        try:
            size = parse_size(args.shard_size)
        except ValueError as e:
            raise ConfigError(f"--shard-size: {e}") from None
        if size <= 0:
            raise ConfigError(f"--shard-size: must be > 0, got {args.shard_size!r}")
        from flowrl_jax.checkpoint.hf import has_tokenizer  # imports JAX: converting only

        tok = args.tokenizer
        if tok is not None and not Path(tok).is_dir():
            raise ConfigError(f"--tokenizer {tok}: not a directory")
        if tok is not None and not has_tokenizer(tok):
            raise ConfigError(f"--tokenizer {tok}: holds no tokenizer files (tokenizer.json, "
                              "vocab.json or tokenizer.model)")


def run(args: argparse.Namespace) -> int:
    """Entry point; errors (flowrl_jax.errors) reach `cli.main`, which prints them as one line."""
    if not args.direction:
        print("flowrl-jax convert: choose hf-to-orbax or orbax-to-hf", file=sys.stderr)
        return 2
    check_args(args)
    return _hf_to_orbax(args) if args.direction == "hf-to-orbax" else _orbax_to_hf(args)
