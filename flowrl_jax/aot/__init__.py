"""Ahead-of-time compilation of one RL step's programs for a TPU slice, on any machine
(`flowrl-jax check`): topologies, abstract state, the programs, the report."""
