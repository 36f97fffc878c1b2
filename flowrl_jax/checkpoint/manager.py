"""The training checkpoint manager: one atomic, async Orbax checkpoint per saved rollout step.

A step directory holds three items:
  `policy` — the policy's nnx.State as a pure dict (the same layout `checkpoint/orbax.py`
             writes, so `flowrl-jax convert orbax-to-hf` and `load_model` read training runs);
  `train`  — everything else the trainer needs to continue bit-exactly (optimizer state,
             Z-network / critic, RNG keys, ...), flattened to {"path": array};
  `meta`   — JSON: step, data-iterator state, metric history, config fingerprint.

Orbax writes a step into a temporary directory and renames it when complete, so a partial
write is never listed. Restoring tells three failures apart:
  - the stored trees do not fit the requested ones (other shapes, keys or dtypes: the config
    changed) → `ConfigError` naming each difference; nothing is touched;
  - a transient read error (an OSError other than "file missing", an object-store hiccup,
    MemoryError) → retried a few times, then `CheckpointError`; nothing is touched;
  - an integrity failure (missing or truncated files, unreadable metadata) → only that step is
    moved aside to `<dir>/../<name>.corrupt/` with a warning and the previous step is tried.
Directories may be local or `gs://` (etils epath / tensorstore).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any, Callable, Optional, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flowrl_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

POLICY, TRAIN, META = "policy", "train", "meta"
#: suffix of the directory beside the checkpoints that holds steps set aside as corrupt
SET_ASIDE_SUFFIX = ".corrupt"
#: transient read errors: attempts per read, and the first pause between them (doubled)
READ_ATTEMPTS, RETRY_DELAY_S = 3, 0.5
# tensorstore reports storage failures as ValueError with a status; these ones may pass
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                     "Input/output error", "Connection reset", "timed out")
_MISSING_ERRNO = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    """A read error worth retrying (and never a reason to set a checkpoint aside)."""
    if isinstance(e, (ConfigError, CheckpointError)):
        return False
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError):
        return e.errno not in _MISSING_ERRNO and not isinstance(e, FileNotFoundError)
    return any(k in str(e) for k in _TRANSIENT_STATUS)


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

    def _read(self, step: int, what: str, fn: Callable[[], T]) -> T:
        """`fn()` with transient errors retried; after the last attempt a CheckpointError that
        says the step was left in place. Other errors propagate (integrity failures)."""
        delay = RETRY_DELAY_S
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - sorted into transient / not below
                if not is_transient(e):
                    raise
                if attempt == READ_ATTEMPTS:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory}: reading its {what} failed "
                        f"{attempt} times ({_brief(e)}); it was left in place, rerun when the "
                        "storage is readable") from e
                log.warning("checkpoint step %d: reading its %s failed (%s); retrying in %.1f s",
                            step, what, _brief(e), delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def restore_meta(self, step: int) -> dict:
        """Only the JSON meta of a step."""
        out = self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def stored_arrays(self, step: int, item: str) -> dict[str, Any]:
        """{flat key: array metadata (shape, dtype)} of one stored item, no arrays read."""
        handler = ocp.StandardCheckpointHandler()  # the item dir itself: no Checkpointer wrapper
        try:
            meta = handler.metadata(self.directory / str(step) / item)
        finally:
            handler.close()
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict):
            raise ValueError(f"item {item!r} has no readable tree metadata")
        return flatten_tree(tree)

    def check_fits(self, step: int, policy_like: Any, train_like: Any) -> None:
        """ConfigError naming every stored array whose key, shape or dtype differs from the
        requested trees (the config builds another model or optimizer); nothing is read."""
        diffs: list[str] = []
        for item, like, cmp_dtype in ((POLICY, flatten_tree(policy_like), True),
                                      (TRAIN, flatten_tree(train_like), False)):
            stored = self.stored_arrays(step, item)
            for k in sorted(set(like) - set(stored)):
                diffs.append(f"{item} {k!r} missing from the checkpoint")
            for k in sorted(set(stored) - set(like)):
                diffs.append(f"{item} {k!r} not in the model the config builds")
            for k in sorted(set(like) & set(stored)):
                want, got = _abstract(like[k]), stored[k]
                shape = getattr(got, "shape", None)
                if shape is not None and tuple(shape) != tuple(want.shape):
                    diffs.append(f"{item} {k!r} stored {tuple(shape)}, config {tuple(want.shape)}")
                dtype = getattr(got, "dtype", None)
                if cmp_dtype and dtype is not None and np.dtype(dtype) != np.dtype(want.dtype):
                    diffs.append(f"{item} {k!r} stored {np.dtype(dtype)}, config "
                                 f"{np.dtype(want.dtype)}")
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise ConfigError(f"checkpoint step {step} in {self.directory} does not fit the "
                              f"config: {'; '.join(diffs[:5])}{more}; resume with the settings "
                              "the run was started with, or use a new --out")

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
        """Newest restorable step as (step, policy, train, meta); None when there is none.

        `check(meta)` may raise to reject a checkpoint (a config mismatch); it propagates, as
        does a mismatch of the stored trees (ConfigError) and a persistent transient read error
        (CheckpointError), all before anything is moved. Only a step that fails an integrity
        check is set aside with a warning, and the previous one tried; when every step fails,
        a CheckpointError says where they went.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                meta = self._read(step, "metadata", lambda: self.restore_meta(step))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - unreadable meta: an integrity failure
                self._unusable(step, e)
                continue
            if check is not None:
                check(meta)  # before touching arrays: a config mismatch is not corruption
            try:
                self._read(step, "array metadata",
                           lambda: self.check_fits(step, policy_like, train_like))
            except (ConfigError, CheckpointError):
                raise
            except Exception as e:  # noqa: BLE001 - unreadable array metadata
                self._unusable(step, e)
                continue
            try:
                policy, train, meta = self._read(
                    step, "arrays", lambda: self.restore_step(step, policy_like, train_like))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - missing / truncated array files
                self._unusable(step, e)
                continue
            return step, policy, train, meta
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be restored; they "
                f"were set aside in {self.set_aside_dir}; the run does not restart from step 0 "
                "over them: use a new --out, or --no-resume to start again from step 0 here")
        return None

    # ------------------------------------------------------------------ set-aside steps

    @property
    def set_aside_dir(self) -> epath.Path:
        """Where steps that failed an integrity check are moved."""
        return self.directory.parent / f"{self.directory.name}{SET_ASIDE_SUFFIX}"

    def set_aside(self) -> list[str]:
        """Names of the steps set aside so far (`<step>-<unix time>`)."""
        d = self.set_aside_dir
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def step_dirs(self) -> list[str]:
        """Every step-named directory, listed by Orbax or not (e.g. one it cannot read)."""
        return sorted(p.name for p in self.directory.iterdir() if p.name.isdigit()) \
            if self.directory.exists() else []

    def _unusable(self, step: int, e: Exception) -> None:
        log.warning("checkpoint step %d in %s cannot be restored (%s); "
                    "falling back to the previous checkpoint", step, self.directory, _brief(e))
        self._move_aside(step)

    def _move_aside(self, step: int) -> None:
        """Rename a bad step dir out of the manager's view (so later saves are not blocked)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst_root = self.set_aside_dir
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / f"{step}-{int(time.time())}"
            try:
                src.rename(dst)
                log.warning("moved unusable checkpoint %s to %s", src, dst)
            except OSError as e:
                log.warning("could not move unusable checkpoint %s aside: %s", src, e)
        self._mgr.close()
        self._mgr = self._open()


def _brief(e: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters)."""
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {msg}"
