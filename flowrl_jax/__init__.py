"""flowrl-jax: FlowRL and baselines for RL post-training of LLMs in JAX."""
__version__ = "0.1.0"
