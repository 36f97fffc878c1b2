"""cpu_runtime.configure(): freed host memory stays mapped for reuse, CPU dispatch is
synchronous, and FLOWRL_JAX_CPU_RUNTIME=default leaves the process as it was. Each case runs
in a fresh interpreter: the settings are process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, os
from flowrl_jax import cpu_runtime
applied = cpu_runtime.configure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = 256 << 20  # far above glibc's largest mmap threshold (32 MiB)
p = libc.malloc(n)
ctypes.memset(p, 1, n)
touched = rss()
libc.free(p)
freed = rss()
import jax
print(json.dumps({"applied": applied, "kept_after_free": freed > touched - n // 2,
                  "async_dispatch": bool(jax.config.values["jax_cpu_enable_async_dispatch"])}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings exist only with glibc on Linux")


def _probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "FLOWRL_JAX_CPU_RUNTIME"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_configure_keeps_freed_memory_and_makes_dispatch_synchronous():
    r = _probe()
    assert r["applied"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1,
                            "jax_cpu_enable_async_dispatch": False}
    assert r["kept_after_free"], "a freed 256 MiB block was returned to the OS"
    assert r["async_dispatch"] is False


@glibc_only
def test_default_setting_leaves_glibc_and_jax_alone():
    r = _probe(FLOWRL_JAX_CPU_RUNTIME="default")
    assert r["applied"] is None
    assert not r["kept_after_free"], "glibc's default should unmap a freed 256 MiB block"
    assert r["async_dispatch"] is True


def test_console_script_configures_before_the_command_runs(monkeypatch):
    from pathlib import Path

    from flowrl_jax import cli, cpu_runtime

    calls = []
    monkeypatch.setattr(cpu_runtime, "configure", lambda: calls.append("configure"))
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    assert cli.entry() == 0
    assert calls == ["configure", "main"]
    pyproject = (Path(cli.__file__).parents[1] / "pyproject.toml").read_text()
    assert 'flowrl-jax = "flowrl_jax.cli:entry"' in pyproject


def test_model_pass_options_follow_the_widest_activation():
    """YNNPACK element-wise fusions only for small passes on CPU; the width excludes the
    vocabulary even where it equals the MLP width (the tiny preset: both 128)."""
    import dataclasses

    from flax import nnx

    from flowrl_jax.bench.train import _arch
    from flowrl_jax.cpu_runtime import YNN_ELTWISE_MAX_ACTIVATION, model_pass_compiler_options
    from flowrl_jax.models.qwen2 import build_model
    from flowrl_jax.rl.forward import widest_layer

    tiny = _arch("tiny")
    assert tiny.vocab_size == tiny.intermediate_size == 128
    assert widest_layer(nnx.state(build_model(tiny), nnx.Param)) == 128
    untied = dataclasses.replace(tiny, vocab_size=1000, tie_word_embeddings=False)
    assert widest_layer(nnx.state(build_model(untied), nnx.Param)) == 128

    small = model_pass_compiler_options("cpu", YNN_ELTWISE_MAX_ACTIVATION)
    assert "ELTWISE" in small["xla_cpu_experimental_ynn_fusion_type"]
    assert model_pass_compiler_options("cpu", YNN_ELTWISE_MAX_ACTIVATION + 1) is None
    assert model_pass_compiler_options("gpu", 1) is None
