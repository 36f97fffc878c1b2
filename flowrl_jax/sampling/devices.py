"""Where and in which dtype `sample`, `serve` and `eval` run a model: the --devices and --dtype
choices they share (auto: the whole accelerator in bfloat16; one CPU device in float32)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from flowrl_jax.mesh import make_mesh, single_device_mesh


def sampling_mesh(devices: str) -> Mesh:
    """1-device mesh, or all devices on the fsdp axis (auto: all on GPU/TPU, 1 on CPU)."""
    if devices == "auto":
        devices = "1" if jax.default_backend() == "cpu" else "all"
    return make_mesh() if devices == "all" else single_device_mesh()


def resolve_dtype(name: str) -> str:
    """--dtype auto → bfloat16 on GPU/TPU, float32 on CPU; other names pass through."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
