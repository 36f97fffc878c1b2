"""Accelerator data-sheet peaks (for MFU and roofline fractions) and a measured matmul rate.

Keys are lower-case substrings of jax's `device.device_kind`; the longest match wins.
"""

from __future__ import annotations

import time
from typing import Optional

# Vendor bf16 dense peak FLOP/s per chip (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,  # H100 SXM
    "h200": 989e12,
    "a100": 312e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v4": 275e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
}

# Peak HBM bandwidth, bytes/s per chip.
PEAK_HBM = {
    "h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12, "l4": 3.0e11,
    "tpu v6": 1.64e12, "tpu v5p": 2.765e12, "tpu v5 lite": 8.19e11, "tpu v5e": 8.19e11,
    "tpu v4": 1.2e12,
}


def _lookup(table: dict[str, float], device_kind: str) -> Optional[float]:
    kind = device_kind.lower()
    for key in sorted(table, key=len, reverse=True):
        if key in kind:
            return table[key]
    return None


def peak_flops(device_kind: str) -> Optional[float]:
    """bf16 dense peak FLOP/s of one chip, None when unknown (e.g. CPU)."""
    return _lookup(PEAK_FLOPS, device_kind)


def peak_hbm_bandwidth(device_kind: str) -> Optional[float]:
    """Peak HBM bytes/s of one chip, None when unknown (e.g. CPU)."""
    return _lookup(PEAK_HBM, device_kind)


def measured_matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a big float32 jnp matmul on the default device (best of `reps`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
