"""Devices for each role: `rollout.devices` gives the sampler its own sub-mesh (the last
devices) and the trainer the rest; without it both roles time-share every device."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
from jax.sharding import Mesh

from flowrl_jax.config import Config, MeshConfig
from flowrl_jax.errors import ConfigError
from flowrl_jax.mesh import make_mesh


def sampler_device_count(devices: Union[int, float], total: int) -> int:
    """How many of `total` devices `rollout.devices` (a count or a fraction) gives the
    sampler; the trainer must keep at least one."""
    n = devices if isinstance(devices, int) else int(round(devices * total))
    if not 1 <= n < total:
        raise ConfigError(f"rollout.devices: {devices!r} of the {total} devices leaves "
                          f"{total - n} for the trainer and {n} for the sampler; each role "
                          "needs at least one")
    return n


def role_meshes(cfg: Config, devices: Optional[Sequence[jax.Device]] = None
                ) -> tuple[Mesh, Mesh]:
    """(trainer mesh, sampler mesh) over `devices` (default: all) split by `rollout.devices`:
    the trainer's mesh follows `cfg.mesh` on the first devices, the sampler's puts its
    devices on the fsdp axis (the batch of decode slots is split over them)."""
    devices = list(devices) if devices is not None else jax.devices()
    n = sampler_device_count(cfg.rollout.devices, len(devices))
    trainer = make_mesh(cfg.mesh, devices[:len(devices) - n])
    sampler = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices[len(devices) - n:])
    return trainer, sampler


def trainer_and_sampler_meshes(cfg: Config, mesh: Optional[Mesh] = None) -> tuple[Mesh, Mesh]:
    """(trainer mesh, sampler mesh) of a run on `mesh` (default: from `cfg.mesh`): split by
    `rollout.devices`, else shared on one process; on several processes every host samples
    its own prompts on its local devices (the sampler reads tokens back to the host each
    decode chunk: addressable arrays)."""
    if cfg.rollout.devices is not None:
        return role_meshes(cfg, list(mesh.devices.flat) if mesh is not None else None)
    trainer = mesh if mesh is not None else make_mesh(cfg.mesh)
    if jax.process_count() == 1:
        return trainer, trainer
    local = sorted(jax.local_devices(), key=lambda d: d.id)  # same rule on every host
    return trainer, make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), local)
