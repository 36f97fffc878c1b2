"""Orbax checkpoints of the policy parameters, restorable onto any mesh.

Layout (shared with the trainer's CheckpointManager in checkpoint/manager.py, so these
loaders read training runs too):

    CKPT_DIR/                  an `ocp.CheckpointManager` directory
      model.json               {"format", "version", "arch": ModelArch fields, "param_dtype"}
      tokenizer/               optional tokenizer files
      <step>/policy/           item "policy": the policy nnx.State as a pure dict (StandardSave)
      <step>/<other items>     trainer only (Z-network, optimizer, data iterator, ...)

A training run directory RUN has its checkpoints in RUN/checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from flowrl_jax.checkpoint.hf import copy_tokenizer, has_tokenizer
from flowrl_jax.checkpoint.safetensors_io import CheckpointError
from flowrl_jax.config import ConfigError, ModelArch, build_dataclass
from flowrl_jax.mesh import state_shardings
from flowrl_jax.models.qwen2 import (Numerics, Qwen2ForCausalLM, abstract_model, dtype_of,
                                     with_layer_form)
from flowrl_jax.paths import as_path, is_url

PathLike = Union[str, os.PathLike]
POLICY_ITEM = "policy"
MODEL_JSON = "model.json"
TOKENIZER_SUBDIR = "tokenizer"
RUN_CHECKPOINTS = "checkpoints"
FORMAT = "flowrl-jax/policy"
VERSION = 1


# --------------------------------------------------------------------------- model.json


def write_model_json(ckpt_dir: PathLike, arch: ModelArch, param_dtype: str) -> Any:
    """Write CKPT_DIR/model.json atomically: temp file + rename locally; a URL such as
    gs://bucket/run/checkpoints goes through etils (object stores write whole objects)."""
    body = json.dumps({"format": FORMAT, "version": VERSION, "arch": dataclasses.asdict(arch),
                       "param_dtype": param_dtype}, indent=2) + "\n"
    if is_url(ckpt_dir):
        d = as_path(ckpt_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / MODEL_JSON).write_text(body)
        return d / MODEL_JSON
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / MODEL_JSON
    tmp = p.with_name(f".{MODEL_JSON}.tmp-{os.getpid()}")
    tmp.write_text(body)
    os.replace(tmp, p)
    return p


def read_model_json(ckpt_dir: PathLike) -> tuple[ModelArch, str]:
    """(arch, param dtype name) from CKPT_DIR/model.json; errors name the file and key."""
    p = Path(ckpt_dir) / MODEL_JSON
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a flowrl-jax checkpoint directory?)")
    try:
        body = json.loads(p.read_text())
        arch = build_dataclass(ModelArch, body["arch"], f"{p}: arch")
        arch.validate(f"{p}: arch")
        dtype = body.get("param_dtype", "float32")
        dtype_of(dtype)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{p}: missing key {e.args[0]!r}") from e
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return arch, dtype


# --------------------------------------------------------------------------- locating


def resolve_checkpoint_dir(path: PathLike) -> Path:
    """The checkpoint directory for a checkpoint dir or a training run dir (RUN/checkpoints)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint directory does not exist")
    if not (p / MODEL_JSON).exists() and (p / RUN_CHECKPOINTS / MODEL_JSON).exists():
        return p / RUN_CHECKPOINTS
    return p


def _manager(ckpt_dir: Path, create: bool = False, max_to_keep: Optional[int] = None) -> Any:
    opts = ocp.CheckpointManagerOptions(create=create, max_to_keep=max_to_keep)
    return ocp.CheckpointManager(ckpt_dir.absolute(), options=opts)


def latest_step(ckpt_dir: PathLike) -> Optional[int]:
    """The newest complete (committed) step in a checkpoint directory, or None."""
    d = resolve_checkpoint_dir(ckpt_dir)
    mngr = _manager(d)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def all_steps(ckpt_dir: PathLike) -> list[int]:
    """All complete steps, ascending."""
    d = resolve_checkpoint_dir(ckpt_dir)
    mngr = _manager(d)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


# --------------------------------------------------------------------------- save


def policy_pure_dict(model_or_state: Any) -> dict:
    """The policy params as the pure nested dict stored under item `policy`."""
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        return nnx.to_pure_dict(model_or_state)
    return model_or_state


def save_policy(ckpt_dir: PathLike, model_or_state: Any, arch: ModelArch, step: int = 0, *,
                param_dtype: Optional[str] = None, tokenizer_dir: Optional[PathLike] = None,
                max_to_keep: Optional[int] = None) -> Path:
    """Save the policy params as step `step` of an Orbax CheckpointManager dir (+ model.json)."""
    d = Path(ckpt_dir)
    pure = policy_pure_dict(model_or_state)
    if param_dtype is None:
        leaf = jax.tree.leaves(pure)[0]
        param_dtype = np.dtype(leaf.dtype).name
    mngr = _manager(d, create=True, max_to_keep=max_to_keep)
    try:
        if step in mngr.all_steps():
            raise CheckpointError(f"{d}: step {step} already exists; choose another step or an "
                                  f"empty directory")
        if jax.process_index() == 0:  # one writer in multi-host runs
            write_model_json(d, arch, param_dtype)
        if tokenizer_dir is not None and jax.process_index() == 0:
            (d / TOKENIZER_SUBDIR).mkdir(exist_ok=True)
            copy_tokenizer(tokenizer_dir, d / TOKENIZER_SUBDIR)
        mngr.save(step, args=ocp.args.Composite(**{POLICY_ITEM: ocp.args.StandardSave(pure)}))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return d / str(step)


# --------------------------------------------------------------------------- restore


def policy_target(arch: ModelArch, num: Numerics, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract state, restore target) with the mesh's NamedShardings."""
    graphdef, state = nnx.split(abstract_model(arch, num))
    shardings = state_shardings(state, mesh)

    def sds(var: Any, sh: Any) -> jax.ShapeDtypeStruct:
        v = var.get_value()
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)

    target = jax.tree.map(sds, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state, policy_pure_dict(target)


def _flatten(tree: Any, prefix: tuple = ()) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {".".join(prefix): tree}


def _stored_arrays(item_dir: Path) -> dict[str, Any]:
    """{dotted path: array metadata} of a stored policy item."""
    try:
        meta = ocp.StandardCheckpointer().metadata(item_dir)
        return _flatten(getattr(meta, "item_metadata", meta).tree)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: say which dir
        raise CheckpointError(f"{item_dir}: cannot read checkpoint metadata: {e}") from e


def _stored_scanned(stored: dict[str, Any]) -> bool:
    """Whether a stored policy holds stacked (scanned) decoder layers (qwen2.DecoderStack)."""
    return any(k.startswith("layers.stacked.") for k in stored)


def _check_stored_shapes(item_dir: Path, target: dict, stored: dict[str, Any]) -> None:
    """Compare the stored array shapes with the target's; name the first mismatch."""
    want = _flatten(target)
    missing = sorted(set(want) - set(stored))
    if missing:
        raise CheckpointError(f"{item_dir}: tensor {missing[0]!r} is missing from the checkpoint "
                              f"({len(missing)} missing)")
    extra = sorted(set(stored) - set(want))
    if extra:
        raise CheckpointError(f"{item_dir}: unexpected tensor {extra[0]!r} in the checkpoint "
                              f"(model.json arch does not match the stored params)")
    for k, t in want.items():
        shape = tuple(getattr(stored[k], "shape", ()) or ())
        if shape != tuple(t.shape):
            raise CheckpointError(f"{item_dir}: tensor {k!r} has shape {shape}, expected "
                                  f"{tuple(t.shape)} from {MODEL_JSON}")


def restore_policy_state(ckpt_dir: PathLike, mesh: Mesh, num: Numerics | None = None,
                         step: Optional[int] = None) -> tuple[nnx.GraphDef, nnx.State, ModelArch, int]:
    """(graphdef, sharded param state, arch, step) restored onto `mesh` (any mesh)."""
    d = resolve_checkpoint_dir(ckpt_dir)
    arch, dtype = read_model_json(d)
    num = num or Numerics(param_dtype=dtype_of(dtype), compute_dtype=dtype_of(dtype))
    mngr = _manager(d)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise CheckpointError(f"{d}: no complete checkpoint step (only unfinished or none)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{d}: step {step} not found (complete steps: {steps})")
        item_dir = d / str(step) / POLICY_ITEM
        if not item_dir.is_dir():
            raise CheckpointError(f"{item_dir}: missing (step {step} has no '{POLICY_ITEM}' item)")
        # restored in the layer form it was saved in, then converted to the one asked for
        stored = _stored_arrays(item_dir)
        saved_num = dataclasses.replace(num, scan_layers=_stored_scanned(stored))
        graphdef, state, target = policy_target(arch, saved_num, mesh)
        _check_stored_shapes(item_dir, target, stored)
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{POLICY_ITEM: ocp.args.StandardRestore(target)}))
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(state, restored[POLICY_ITEM])
    if saved_num.scan_layers != num.scan_layers:
        model = with_layer_form(nnx.merge(graphdef, state), num.scan_layers)
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda v, sh: v.replace(jax.device_put(v.get_value(), sh)), state,
                             state_shardings(state, mesh),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state, arch, step


def restore_policy(ckpt_dir: PathLike, mesh: Mesh, num: Numerics | None = None,
                   step: Optional[int] = None) -> tuple[Qwen2ForCausalLM, ModelArch]:
    """The policy model restored from a checkpoint dir (or run dir) onto `mesh`."""
    graphdef, state, arch, _ = restore_policy_state(ckpt_dir, mesh, num, step)
    return nnx.merge(graphdef, state), arch


def checkpoint_tokenizer_dir(ckpt_dir: PathLike) -> Optional[Path]:
    """CKPT_DIR/tokenizer when it holds tokenizer files, else None."""
    d = resolve_checkpoint_dir(ckpt_dir) / TOKENIZER_SUBDIR
    return d if d.is_dir() and has_tokenizer(d) else None
