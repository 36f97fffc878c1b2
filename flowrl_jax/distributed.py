"""Multi-process start-up: call `jax.distributed.initialize` when more than one process runs.

Detected launchers, in order:
  * explicit env: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES (> 1) + JAX_PROCESS_ID;
  * SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1 (jax reads the coordinator from SLURM itself);
  * TPU pod slices: TPU_WORKER_HOSTNAMES listing more than one host (jax auto-detects).
A single process does nothing, so the same command runs on a laptop, a GPU node or a pod.
Must be called before anything touches a JAX backend.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

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
    import jax

    if info.kind == "env":
        jax.distributed.initialize(coordinator_address=info.coordinator,
                                   num_processes=info.num_processes, process_id=info.process_id)
    else:  # SLURM and TPU pods: jax's cluster auto-detection fills everything in
        jax.distributed.initialize()
    _initialized = True
    log.info("jax.distributed: process %d of %d (%s launch), %d global devices",
             jax.process_index(), jax.process_count(), info.kind, jax.device_count())
    return info
