"""Loading a run config: YAML files with `include:`, dotted `key=value` overrides, model
presets (configs/models/), then the typed, validated `Config`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from flowrl_jax.config.arch import ModelArch
from flowrl_jax.config.mapping import build_dataclass
from flowrl_jax.config.root import Config
from flowrl_jax.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("task",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, or relative to the packaged configs/ directory."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file {str(path)!r} not found (also looked in {CONFIG_DIR})")


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict[str, Any]:
    """Read a YAML config file and merge its `include:` files (depth first, file wins)."""
    p = resolve_config_path(path).resolve()
    if p in _seen:
        raise ConfigError(f"{p}: include cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = (p.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        if not inc_path.exists():
            inc_path = resolve_config_path(inc)
        merged = _deep_merge(merged, load_yaml_tree(inc_path, _seen + (p,)))
    return _deep_merge(merged, data)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    tree = dict(tree)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {ov!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def _resolve_model_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """`model.arch` from `model.preset` (configs/models/<preset>.yaml), refined by any
    `model.arch` keys given with it (e.g. a preset's width at fewer layers)."""
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return tree
    arch = model.get("arch")
    if arch is not None and not isinstance(arch, dict):
        raise ConfigError(f"model.arch: expected a mapping, got {type(arch).__name__}")
    tree = dict(tree)
    tree["model"] = dict(model, arch=_deep_merge(preset_tree(model["preset"]), arch or {}))
    return tree


def preset_tree(preset: str, key: str = "model.preset") -> dict[str, Any]:
    """The architecture mapping of configs/models/<preset>.yaml; unknown names list the known."""
    p = CONFIG_DIR / "models" / f"{preset}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in (CONFIG_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"{key}: unknown preset {preset!r} (known: {', '.join(known)})")
    return yaml.safe_load(p.read_text()) or {}


def preset_arch(preset: str, key: str = "model.preset") -> ModelArch:
    """A validated `ModelArch` from configs/models/<preset>.yaml."""
    arch = ModelArch(**preset_tree(preset, key))
    arch.validate(key)
    return arch


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a nested mapping."""
    tree = _resolve_model_preset(tree)
    cfg = build_dataclass(Config, tree)
    cfg.validate()
    return cfg


def _sets_preset(overrides: list[str]) -> bool:
    """Whether an override names a model preset (not `model.preset=null`)."""
    named = False
    for ov in overrides:
        key, _, raw = ov.partition("=")
        if key.strip() == "model.preset":  # the last one counts, as in apply_overrides
            named = raw.strip() not in ("", "null", "~")
    return named


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with includes) and dotted overrides into a validated `Config`."""
    tree = load_yaml_tree(path) if path is not None else {}
    overrides = list(overrides or [])
    if _sets_preset(overrides) and isinstance(tree.get("model"), dict):
        # a preset named on the command line replaces the file's architecture (demo.yaml
        # spells one out); `model.arch.KEY=...` overrides then refine the preset
        tree = dict(tree, model={k: v for k, v in tree["model"].items() if k != "arch"})
    tree = apply_overrides(tree, overrides)
    return config_from_dict(tree)
