"""`flowrl-jax eval`: the evaluation runner of flowrl_jax.eval behind the CLI."""

from flowrl_jax.eval.runner import add_arguments, run

__all__ = ["add_arguments", "run"]
