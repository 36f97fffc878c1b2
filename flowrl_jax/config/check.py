"""The one validation helper of the config sections: a failed check is a ConfigError naming
the dotted key."""

from __future__ import annotations

from flowrl_jax.errors import ConfigError


def check(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError("key: msg")` unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
