"""Benchmarks, each measured side by side with a reference in the same run.

Each bench is a module `flowrl_jax.bench.<name>` exposing
`add_arguments(parser)` (optional) and `run(args) -> list[dict]`: one dict per case with at
least `bench`, `ours`, `reference`, `unit`, `ratio` (ours ÷ reference) and the case's parameters.
"""

BENCHES = ("convert", "train", "sample", "rollout", "rewards", "attention")
