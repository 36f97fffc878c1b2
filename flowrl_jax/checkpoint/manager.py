"""The training checkpoint manager: one atomic, async Orbax checkpoint per saved rollout step.

A step directory holds three items:
  `policy` — the policy's nnx.State as a pure dict (the same layout `checkpoint/orbax.py`
             writes, so `flowrl-jax convert orbax-to-hf` and `load_model` read training runs);
  `train`  — everything else the trainer needs to continue bit-exactly (optimizer state,
             Z-network / critic, RNG keys, ...), flattened to {"path": array};
  `meta`   — JSON: step, data-iterator state, metric history, config fingerprint.

Orbax writes a step into a temporary directory and renames it when complete, so a partial
write is never listed. A step that is listed but fails to restore (corrupted files) is moved
aside to `<dir>/../<name>.corrupt/` with a warning and the previous step is tried.
Directories may be local or `gs://` (etils epath / tensorstore).
"""

from __future__ import annotations

import os

import logging
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flowrl_jax.errors import CheckpointError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

POLICY, TRAIN, META = "policy", "train", "meta"


def _keystr(path: tuple) -> str:
    """A stable string for a pytree key path (used as the flat key of the `train` item)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) or "_"


def flatten_tree(tree: Any) -> dict[str, Any]:
    """{path: leaf} for a pytree (orbax-friendly: no empty nodes or namedtuples)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in flat:
        k = _keystr(path)
        if k in out:
            raise ValueError(f"checkpoint: duplicate flattened key {k!r}")
        out[k] = leaf
    return out


def unflatten_like(flat: dict[str, Any], like: Any) -> Any:
    """Inverse of `flatten_tree` onto the structure of `like`; a missing key raises naming it."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        k = _keystr(path)
        if k not in flat:
            raise KeyError(f"checkpoint item '{TRAIN}' has no entry {k!r}")
        leaves.append(flat[k])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract(x: Any) -> Any:
    """ShapeDtypeStruct (with sharding when known) for an array-like leaf."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    a = np.asarray(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


class TrainCheckpointManager:
    """Save / restore (policy, train state, meta) per step; keep last N + every k-th."""

    def __init__(self, directory: str, keep_last: int = 3, keep_every: Optional[int] = None,
                 async_save: bool = True):
        # Orbax/tensorstore need absolute local paths; URLs (gs://) are kept as they are.
        self.directory = epath.Path(directory if "://" in str(directory)
                                    else os.path.abspath(directory))
        self.keep_last, self.keep_every = keep_last, keep_every
        self._async = async_save
        self._mgr = self._open()

    def _open(self) -> ocp.CheckpointManager:
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep_last, keep_period=self.keep_every, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=self._async)
        return ocp.CheckpointManager(self.directory, options=opts,
                                     item_names=(POLICY, TRAIN, META))

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Steps whose checkpoint is complete (committed), ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, policy: Any, train: Any, meta: dict) -> None:
        """Start an async save of one step (returns once the arrays are copied off device)."""
        args = ocp.args.Composite(**{
            POLICY: ocp.args.StandardSave(policy),
            TRAIN: ocp.args.StandardSave(flatten_tree(train)),
            META: ocp.args.JsonSave(meta),
        })
        self._mgr.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    # ------------------------------------------------------------------ restore

    def restore_meta(self, step: int) -> dict:
        """Only the JSON meta of a step."""
        out = self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def restore_step(self, step: int, policy_like: Any, train_like: Any) -> tuple[Any, Any, dict]:
        """Restore one step onto the shardings/dtypes of the given (abstract or real) trees."""
        policy_t = jax.tree.map(_abstract, policy_like)
        train_t = {k: _abstract(v) for k, v in flatten_tree(train_like).items()}
        out = self._mgr.restore(step, args=ocp.args.Composite(**{
            POLICY: ocp.args.StandardRestore(policy_t),
            TRAIN: ocp.args.StandardRestore(train_t),
            META: ocp.args.JsonRestore(),
        }))
        return out[POLICY], unflatten_like(out[TRAIN], train_like), dict(out[META])

    def restore_latest(self, policy_like: Any, train_like: Any,
                       check: Optional[Callable[[dict], None]] = None
                       ) -> Optional[tuple[int, Any, Any, dict]]:
        """Newest restorable step as (step, policy, train, meta); None when the run is fresh.

        A step that fails to restore is moved aside with a warning and the previous one is
        tried; `check(meta)` may raise to reject a checkpoint (e.g. a config mismatch), which
        propagates instead of falling back.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 - unreadable meta means "unusable"
                self._unusable(step, e)
                continue
            if check is not None:
                check(meta)  # before touching arrays: a config mismatch is not corruption
            try:
                policy, train, meta = self.restore_step(step, policy_like, train_like)
            except Exception as e:  # noqa: BLE001 - any read/shape error means "unusable"
                self._unusable(step, e)
                continue
            return step, policy, train, meta
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} "
                                  "could be restored")
        return None

    def _unusable(self, step: int, e: Exception) -> None:
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); "
                    "falling back to the previous checkpoint", step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        self._move_aside(step)

    def _move_aside(self, step: int) -> None:
        """Rename a bad step dir out of the manager's view (so later saves are not blocked)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst_root = self.directory.parent / f"{self.directory.name}.corrupt"
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / f"{step}-{int(time.time())}"
            try:
                src.rename(dst)
                log.warning("moved unusable checkpoint %s to %s", src, dst)
            except OSError as e:
                log.warning("could not move unusable checkpoint %s aside: %s", src, e)
        self._mgr.close()
        self._mgr = self._open()
