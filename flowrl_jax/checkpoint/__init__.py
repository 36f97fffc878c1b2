"""Checkpoints: HF safetensors import/export (hf.py) and Orbax policy checkpoints (orbax.py)."""

from flowrl_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["CheckpointError"]
