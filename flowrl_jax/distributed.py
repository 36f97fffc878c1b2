"""Multi-process runs: start-up, and the collectives the trainer needs across hosts.

Start-up: `maybe_initialize` calls `jax.distributed.initialize` when more than one process runs.

Detected launchers, in order:
  * explicit env: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES (> 1) + JAX_PROCESS_ID;
  * SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1 (jax reads the coordinator from SLURM itself);
  * TPU pod slices: TPU_WORKER_HOSTNAMES listing more than one host (jax auto-detects).
A single process does nothing, so the same command runs on a laptop, a GPU node or a pod.
Must be called before anything touches a JAX backend (importing jax does not).

Collectives (each a no-op on one process): `gather_json` (a JSON-able object from every
process), `gather_rows` (a per-process numpy array, stacked), `to_host` (batch-sharded arrays
to numpy, all rows on every host), `any_process` (a flag agreed by all), and
`HostReplica`, which turns the training-layout policy into one copy per host for the
per-host sampler.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from flowrl_jax.mesh import state_shardings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchInfo:
    """How this process was launched: which launcher, and its explicit arguments if any."""

    kind: str  # single | env | slurm | tpu
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    raw = env.get(key)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Work out from the environment whether (and how) this is a multi-process run."""
    env = os.environ if env is None else env
    n = _int(env, "JAX_NUM_PROCESSES")
    if env.get("JAX_COORDINATOR_ADDRESS") and n is not None:
        pid = _int(env, "JAX_PROCESS_ID")
        if n > 1 and pid is None:
            raise ValueError("JAX_NUM_PROCESSES > 1 but JAX_PROCESS_ID is not set")
        if n > 1 and not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={n})")
        return (LaunchInfo("env", env["JAX_COORDINATOR_ADDRESS"], n, pid) if n > 1
                else LaunchInfo("single"))
    if env.get("SLURM_JOB_ID") and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return LaunchInfo("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return LaunchInfo("tpu")
    return LaunchInfo("single")


_initialized = False


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Initialise jax.distributed for a multi-process launch (idempotent); returns the launch."""
    global _initialized
    info = detect_launch(env)
    if info.kind == "single" or _initialized:
        return info
    if info.kind == "env":
        jax.distributed.initialize(coordinator_address=info.coordinator,
                                   num_processes=info.num_processes, process_id=info.process_id)
    else:  # SLURM and TPU pods: jax's cluster auto-detection fills everything in
        jax.distributed.initialize()
    _initialized = True
    log.info("jax.distributed: process %d of %d (%s launch), %d global devices",
             jax.process_index(), jax.process_count(), info.kind, jax.device_count())
    return info


# --------------------------------------------------------------------------- collectives


def gather_json(obj: Any) -> list[Any]:
    """A JSON-able object from every process, in process order."""
    if jax.process_count() == 1:
        return [obj]
    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64)))
    buf = np.zeros((int(n.max()),), np.uint8)
    buf[:payload.size] = payload
    allbufs = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(allbufs[i][:int(n.reshape(-1)[i])]).decode())
            for i in range(jax.process_count())]


def gather_rows(x: np.ndarray) -> np.ndarray:
    """[n, ...] on every process → [processes · n, ...] in process order (same n everywhere)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    out = np.asarray(multihost_utils.process_allgather(x))
    return out.reshape((-1,) + out.shape[2:])


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly multi-process, batch-sharded) arrays: all rows on every host."""
    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


class HostReplica:
    """`replica(policy)`: the policy params as one copy per host, sharded over that host's
    devices (`local_mesh`, the sampler's mesh) and replicated across hosts, built by one
    resharding jit; on one process the params themselves."""

    def __init__(self, local_mesh: Mesh):
        self.local_mesh = local_mesh
        self._fn: Any = None

    def __call__(self, policy: Any) -> Any:
        if jax.process_count() == 1:
            return policy
        if self._fn is None:
            self._fn = self._make(policy)
        fn, local_shardings = self._fn
        leaves, treedef = jax.tree.flatten(fn(policy))
        local = [jax.make_array_from_single_device_arrays(
            x.shape, sh, [s.data for s in sorted(x.addressable_shards, key=lambda s: s.device.id)])
            if len(x.addressable_shards) > 1 else x.addressable_shards[0].data
            for x, sh in zip(leaves, local_shardings)]
        return jax.tree.unflatten(treedef, local)

    def _make(self, policy: Any) -> tuple[Any, list]:
        """(jit: training layout → per-host copies, local sharding of each leaf)."""
        by_host: dict[int, list] = {}
        for d in jax.devices():
            by_host.setdefault(d.process_index, []).append(d)
        # Every host builds the same mesh: one row per process, devices in id order (which
        # is also the order of each host's sampler mesh).
        rows = [sorted(by_host[pi], key=lambda d: d.id) for pi in sorted(by_host)]
        local = self.local_mesh
        shape = (len(rows),) + local.devices.shape
        gmesh = Mesh(np.asarray(rows, dtype=object).reshape(shape), ("hosts",) + local.axis_names)
        local_sh = state_shardings(policy, local)  # NamedSharding per nnx Variable
        specs = jax.tree.leaves(local_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
        out = jax.tree.map(lambda sh: NamedSharding(gmesh, sh.spec), local_sh,
                           is_leaf=lambda x: isinstance(x, NamedSharding))
        return jax.jit(lambda p: p, out_shardings=out), specs
