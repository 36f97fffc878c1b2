"""Config dataclasses ⇄ plain mappings: YAML values type-checked into the fields' types
(`build_dataclass`, walking the dataclasses' annotations, defaults and nested sections), and
back (`config_to_dict`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from flowrl_jax.errors import ConfigError


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless; else ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                          f"{[getattr(a, '__name__', str(a)) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis and isinstance(value, (str, int, float)):
                value = [value]  # a single item where a list is expected
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate `cls` from a mapping, type-checking each field; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Any:
    """A plain nested dict/list version of a config (for saving next to a run)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)
