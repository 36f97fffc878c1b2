"""Benchmarks, each measured side by side with a reference in the same run.

Each bench is a module `flowrl_jax.bench.<name>` exposing
`add_arguments(parser)` (optional) and `run(args) -> list[dict]`: one dict per case with at
least `bench`, `ours`, `reference`, `unit`, `ratio` (ours ÷ reference) and the case's parameters.
"""

BENCHES = ("convert", "train", "sample", "rollout", "rewards", "attention")


def add_dtype_argument(parser, what: str) -> None:
    """`--dtype auto|float32|bfloat16` for `what`; see `resolve_dtype`."""
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help=f"{what}; auto: float32 on CPU, bfloat16 on accelerators")


def resolve_dtype(dtype: str, platform: str) -> str:
    """`--dtype` on a JAX platform: "auto" is float32 on CPU and bfloat16 elsewhere (the
    matrix units' type)."""
    return ("float32" if platform == "cpu" else "bfloat16") if dtype == "auto" else dtype
