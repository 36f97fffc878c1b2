"""`flowrl-jax bench rewards`: reward throughput (lives in flowrl_jax.rewards.bench)."""

from flowrl_jax.rewards.bench import add_arguments, run

__all__ = ["add_arguments", "run"]
