"""Sub-commands of the `flowrl-jax` CLI (one module each: add_arguments + run)."""
