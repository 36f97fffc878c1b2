"""Process settings that make XLA:CPU steps reuse warm host memory.

XLA:CPU allocates each execution's temporaries and outputs (gigabytes per train step at the
Qwen2.5-0.5B shape) with `malloc`. glibc serves blocks above its mmap threshold (≤ 32 MiB)
with a fresh `mmap`, unmaps them on `free` and trims its heap as soon as the top is free,
so every step page-faults and zero-fills its working set again (≈ 2.5 GB/s on a small VM).
With asynchronous CPU dispatch the executable also runs its allocations on a worker
thread, whose glibc arena cannot hold blocks above 64 MiB at all.

`configure()` therefore (1) turns off mmap-backed blocks and heap trimming, so freed blocks
stay in the heap and the next step reuses their pages, and (2) turns off asynchronous CPU
dispatch, so allocations happen on the calling thread, whose main arena can grow without
limit. Measured on 2 cores (BUILD_NOTES.md): 0.5B train step 20.0 → 16.4 s, tiny step
47 → 34 ms; sampling unchanged.

Cost: the process keeps its peak heap mapped until it exits (freed memory is reused, not
returned to the OS). `FLOWRL_JAX_CPU_RUNTIME=default` keeps glibc's and JAX's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

ENV = "FLOWRL_JAX_CPU_RUNTIME"
_applied: Optional[dict[str, object]] = None


def configure() -> Optional[dict[str, object]]:
    """Apply the settings once per process, before JAX creates its CPU client (the CLI
    calls this first thing). Returns what was applied, or None when disabled by
    FLOWRL_JAX_CPU_RUNTIME=default. On a non-glibc host only the dispatch setting applies."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "").strip().lower() == "default":
        return None
    applied: dict[str, object] = {}
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # M_TRIM_THRESHOLD = -1 disables trimming; M_MMAP_MAX = 0 disables mmap-backed blocks
        for name, code, value in (("M_MMAP_MAX", M_MMAP_MAX, 0), ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, -1)):
            if libc.mallopt(code, value) != 1:
                raise OSError(f"mallopt({name}, {value}) failed")
            applied[name] = value
    # Read once, when JAX creates its CPU client; no effect on GPU/TPU devices. A JAX flag,
    # not read from the environment, so it costs importing JAX here (≈ 0.4 s).
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    applied["jax_cpu_enable_async_dispatch"] = False
    _applied = applied
    return applied


# XLA:CPU hands element-wise fusions to YNNPACK only when asked. That wins when every
# activation is small, where per-op overhead dominates (tiny train step 32 → 26 ms), and
# loses at large ones, where XLA's own loop fusions are faster (0.5B shape, 2 layers:
# 3.5 → 3.7 s). So a jitted model pass asks for it by the size of its widest activation.
YNN_ELTWISE_MAX_ACTIVATION = 1 << 20  # elements
_YNN_WITH_ELTWISE = ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in ("DOT", "ELTWISE", "REDUCE"))


def model_pass_compiler_options(platform_name: str, widest_activation: int) -> Optional[dict[str, str]]:
    """`jax.jit(compiler_options=...)` for a forward/backward pass whose largest activation
    has `widest_activation` elements (rows × tokens × widest layer); None = XLA defaults."""
    if platform_name != "cpu" or widest_activation > YNN_ELTWISE_MAX_ACTIVATION:
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": _YNN_WITH_ELTWISE}


# --------------------------------------------------------------------------- platform

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what libtpu itself looks for)


def tpu_chips_present() -> bool:
    """Whether this machine has TPU chips (Google PCI devices); False off Linux."""
    try:
        for dev in os.scandir("/sys/bus/pci/devices"):
            with open(os.path.join(dev.path, "vendor")) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
    except OSError:
        return False
    return False


def libtpu_installed() -> bool:
    """Whether libtpu can be found (without loading it)."""
    import importlib.util  # for a third-party package's presence, not for our modules

    return importlib.util.find_spec("libtpu") is not None


def select_platform() -> Optional[str]:
    """With libtpu installed (the `tpu-aot` extra) on a machine without TPU chips, JAX
    would probe for TPUs at start-up and print libtpu's warnings: pick the CPU platform
    explicitly then. Leaves an explicit JAX_PLATFORMS, TPU machines and NVIDIA machines
    alone. Returns the platform set, or None. Call before JAX creates a backend."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_installed() or tpu_chips_present():
        return None
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return None
    import jax

    jax.config.update("jax_platforms", "cpu")
    return "cpu"


def quiet_tpu_compiler_environment() -> None:
    """On a machine without TPU chips, give libtpu the host description it otherwise warns
    about when `check` loads it to compile for a described slice, and let several such
    compiling processes load it at once (no chips to share; set only when unset)."""
    if tpu_chips_present():
        return
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-1"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
