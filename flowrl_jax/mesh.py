"""Device mesh from config and the one table mapping logical axis names to mesh axes.

Parameters and activations are annotated with *logical* axis names (`embed`, `mlp`, ...).
`LOGICAL_RULES` maps each to a mesh axis (or a tuple of them, or None = replicated), so
changing the parallelism is a config change (mesh sizes, `mesh.rules` entries), never a code
change. A mesh made from a config carries that config's rules (`rules_for`); activations are
constrained only inside `activation_sharding(mesh)` (the train step and log-prob passes), so
the sampler and tools that run the model on one device see no constraint.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flowrl_jax.config import MeshConfig
from flowrl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes. FSDP shards the embedding dimension of every weight; tensor
# parallelism shards heads / MLP width / vocabulary; the batch goes over data and fsdp.
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "cache_batch": ("data", "fsdp"),
    "cache_length": None,
    "z_hidden": None,
    None: None,
}

# The rules of each mesh that `make_mesh` built from a config with `mesh.rules` entries. A Mesh
# compares by its devices and axes, so the newest config's rules win for an identical mesh.
_MESH_RULES: dict[Mesh, dict[str, Any]] = {}
_ACTIVATION_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar(
    "flowrl_activation_mesh", default=None)
_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "flowrl_compute_platform", default=None)
_KERNEL_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar(
    "flowrl_kernel_mesh", default=None)


def rules_for(mesh: Mesh | None) -> dict[str, Any]:
    """The logical-axis rules of `mesh`: LOGICAL_RULES with its config's `mesh.rules` applied."""
    return _MESH_RULES.get(mesh, LOGICAL_RULES) if mesh is not None else LOGICAL_RULES


def merged_rules(overrides: dict[str, Any]) -> dict[str, Any]:
    """LOGICAL_RULES with `overrides` (a mesh config's `rules`: axis name, list or None)."""
    rules = dict(LOGICAL_RULES)
    for name, target in overrides.items():
        rules[name] = tuple(target) if isinstance(target, (list, tuple)) else target
    return rules


def resolve_axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 replaced by the remaining devices; errors name the mesh key."""
    cfg.validate()
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if n_devices % fixed != 0:
        raise ConfigError(
            f"mesh: data×fsdp×tensor = {fixed} does not divide the {n_devices} available devices "
            f"(mesh.data={cfg.data}, mesh.fsdp={cfg.fsdp}, mesh.tensor={cfg.tensor})")
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = n_devices // fixed
    total = math.prod(sizes.values())
    if total != n_devices:
        raise ConfigError(
            f"mesh: data×fsdp×tensor = {total} but {n_devices} devices are available; set one "
            f"axis to -1 to take the remaining devices (mesh.data={cfg.data}, "
            f"mesh.fsdp={cfg.fsdp}, mesh.tensor={cfg.tensor})")
    return sizes


def make_mesh(cfg: MeshConfig | None = None, devices: Optional[Sequence[jax.Device]] = None,
              whole_slice: Optional[bool] = None) -> Mesh:
    """A Mesh over axes (data, fsdp, tensor); multi-host aware (uses all global devices).
    `whole_slice`: order the devices by their physical topology, as for all of
    `jax.devices()` (default: only when `devices` is that); `check` passes a described
    slice's devices this way so that it compiles the mesh a run on the slice builds."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_axis_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if whole_slice is None:
        whole_slice = devices == jax.devices()
    if whole_slice:
        try:
            # Topology-aware device order (ICI rings on TPU); falls back for odd shapes.
            from jax.experimental import mesh_utils
            dev_array = mesh_utils.create_device_mesh(shape, devices=devices,
                                                      allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 - any failure here just means "use plain order"
            dev_array = np.asarray(devices).reshape(shape)
    else:
        dev_array = np.asarray(devices).reshape(shape)
    mesh = Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if cfg.rules:
        _MESH_RULES[mesh] = merged_rules(cfg.rules)
    else:
        _MESH_RULES.pop(mesh, None)
    return mesh


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1×1×1 mesh (tests, tools)."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), [device or jax.devices()[0]])


def logical_to_spec(names: Iterable[Optional[str]], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None,
                    rules: dict[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; with mesh+shape, axes that don't divide are replicated."""
    rules = rules_for(mesh) if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in mesh.LOGICAL_RULES")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard one dim only
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[i] % size != 0:
                    axes = tuple(a for a in axes if shape[i] % mesh.shape[a] == 0)[:1]
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Iterable[Optional[str]],
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for logical axis names."""
    return NamedSharding(mesh, logical_to_spec(tuple(names), mesh, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Shard the leading (batch) dimension over data×fsdp, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), shape)


def logical_axes_of(variable: Any) -> tuple:
    """The `logical_axes` metadata of an nnx Variable (replicated when absent)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    axes = meta.get("logical_axes")
    if axes is None:
        return (None,) * len(getattr(variable, "shape", ()) or ())
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedSharding for every Variable in an nnx State (same tree), from its logical axes."""
    from flax import nnx

    def one(v):
        return named_sharding(mesh, logical_axes_of(v), v.get_value().shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_partition_specs(state: Any, mesh: Mesh) -> Any:
    """Like `state_shardings` but PartitionSpecs."""
    return jax.tree.map(lambda s: s.spec, state_shardings(state, mesh))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `mesh` by its rules."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        with compute_platform(mesh):
            yield
    finally:
        _ACTIVATION_MESH.reset(token)


@contextlib.contextmanager
def compute_platform(mesh: Mesh | None) -> Iterator[None]:
    """While tracing inside this context, `current_platform()` is `mesh`'s device platform
    (so a program compiled for a TPU mesh on a CPU host takes the TPU code paths)."""
    if mesh is None:
        yield
        return
    token = _PLATFORM.set(mesh.devices.flat[0].platform)
    mesh_token = _KERNEL_MESH.set(mesh)
    try:
        yield
    finally:
        _KERNEL_MESH.reset(mesh_token)
        _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform the program being traced will run on: the mesh's inside
    `compute_platform` / `activation_sharding`, else JAX's default backend."""
    return _PLATFORM.get() or jax.default_backend()


def current_mesh() -> Optional[Mesh]:
    """The mesh of the program being traced (set by `compute_platform` /
    `activation_sharding`), else None: per-device kernels (splash attention) map over it."""
    return _KERNEL_MESH.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`x` constrained to the sharding its logical axis names get on the active mesh (a no-op
    outside `activation_sharding`, and for axes a mesh dimension does not divide)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))
