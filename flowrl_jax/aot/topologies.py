"""Named TPU slices (`v5e-8`, `v5p-64`, ...) as device lists for AOT compilation.

`jax.experimental.topologies.get_topology_desc` describes a slice's chips without the
hardware; it needs libtpu (the `tpu-aot` extra), which runs the real TPU compiler on CPU.
Slice names follow Cloud TPU: v5e/v6e count chips, v4/v5p count TensorCores (2 per chip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flowrl_jax.errors import ConfigError

GiB = 1024 ** 3


@dataclass(frozen=True)
class Slice:
    """One named slice: its topology string, host layout and per-chip HBM."""

    name: str
    topology: str  # "<generation>:<chip grid>"
    hbm_bytes: int  # per chip (data sheet)
    chips_per_host_bounds: Optional[tuple[int, int, int]] = None  # None: libtpu's default

    @property
    def chips(self) -> int:
        """Chips in the slice."""
        n = 1
        for d in self.topology.split(":")[1].split("x"):
            n *= int(d)
        return n


# HBM per chip that programs may use: what the TPU compiler reports as available where we
# have seen it ("exceeds available HBM (15.75G)" on v5e, 95.74G on v5p), else the data
# sheet (v6e 32 GiB, v4 32 GiB). A single-host 8-chip v5e/v6e needs chips_per_host_bounds
# (libtpu's default is 4 chips per host).
V5E = int(15.75 * GiB)
V5P = int(95.74 * GiB)
_ONE_HOST_8 = (2, 4, 1)
_ONE_CHIP = (1, 1, 1)  # libtpu's default 2×2 host does not divide a 1×1 slice
SLICES: dict[str, Slice] = {s.name: s for s in (
    Slice("v5e-1", "v5e:1x1", V5E, _ONE_CHIP),
    Slice("v5e-4", "v5e:2x2", V5E),
    Slice("v5e-8", "v5e:2x4", V5E, _ONE_HOST_8),
    Slice("v5e-16", "v5e:4x4", V5E),
    Slice("v5e-32", "v5e:4x8", V5E),
    Slice("v5e-64", "v5e:8x8", V5E),
    Slice("v5e-128", "v5e:8x16", V5E),
    Slice("v5e-256", "v5e:16x16", V5E),
    Slice("v5p-8", "v5p:2x2x1", V5P),
    Slice("v5p-16", "v5p:2x2x2", V5P),
    Slice("v5p-32", "v5p:2x2x4", V5P),
    Slice("v5p-64", "v5p:4x4x2", V5P),
    Slice("v5p-128", "v5p:4x4x4", V5P),
    Slice("v5p-256", "v5p:4x4x8", V5P),
    Slice("v5p-512", "v5p:4x8x8", V5P),
    Slice("v6e-1", "v6e:1x1", 32 * GiB, _ONE_CHIP),
    Slice("v6e-4", "v6e:2x2", 32 * GiB),
    Slice("v6e-8", "v6e:2x4", 32 * GiB, _ONE_HOST_8),
    Slice("v6e-16", "v6e:4x4", 32 * GiB),
    Slice("v6e-32", "v6e:4x8", 32 * GiB),
    Slice("v6e-64", "v6e:8x8", 32 * GiB),
    Slice("v6e-256", "v6e:16x16", 32 * GiB),
    Slice("v4-8", "v4:2x2x1", 32 * GiB),
    Slice("v4-16", "v4:2x2x2", 32 * GiB),
    Slice("v4-32", "v4:2x2x4", 32 * GiB),
)}


def get_slice(name: str) -> Slice:
    """The named slice; an unknown name is a ConfigError listing the known ones."""
    if name not in SLICES:
        raise ConfigError(f"--topology: unknown TPU slice {name!r} (known: {', '.join(SLICES)})")
    return SLICES[name]


def libtpu_available() -> tuple[bool, str]:
    """(whether libtpu can be imported, why not): the TPU compiler `check` needs."""
    try:
        import libtpu  # noqa: F401 - libtpu-only: the optional `tpu-aot` extra
    except ImportError as e:
        return False, (f"libtpu is not installed ({e}); install the tpu-aot extra: "
                       "pip install 'flowrl-jax[tpu-aot]'")
    return True, ""


def slice_devices(sl: Slice) -> list:
    """The slice's devices (TPU device descriptions, no hardware), in id order."""
    ok, why = libtpu_available()
    if not ok:
        raise ConfigError(f"--topology {sl.name}: {why}")
    # libtpu-only API: imported here so that CPU runs never load the TPU plugin
    from jax.experimental import topologies

    kw = {}
    if sl.chips_per_host_bounds is not None:
        kw["chips_per_host_bounds"] = list(sl.chips_per_host_bounds)
    topo = topologies.get_topology_desc(topology_name=sl.topology, platform="tpu", **kw)
    return sorted(topo.devices, key=lambda d: d.id)
