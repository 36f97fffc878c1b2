"""The isolating sandbox backends this machine supports, for tests parametrised over them."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from flowrl_jax.rewards.sandbox import ISOLATING_BACKENDS, SandboxConfig, isolation_mode  # noqa: F401 (re-exported)
from flowrl_jax.rewards.sandbox_mounts import SandboxError


def backend_config(cfg: SandboxConfig, backend: str) -> SandboxConfig:
    """`cfg` pinned to `backend`; skips the test (with the reason) where the machine lacks it."""
    pinned = dataclasses.replace(cfg, isolation=backend)
    try:
        isolation_mode(pinned)
    except SandboxError as exc:
        pytest.skip(f"sandbox backend {backend!r} unavailable on this machine: {str(exc)[:300]}")
    return pinned


def drops_uid(cfg: SandboxConfig) -> bool:
    """True when programs run under a uid of their own (root), not the caller's."""
    return isolation_mode(cfg)[1] is not None




@functools.cache
def isolated_here() -> bool:
    """True when some isolating backend works on this machine."""
    try:
        return isolation_mode(SandboxConfig(policy="required"))[0] in ISOLATING_BACKENDS
    except SandboxError:
        return False
