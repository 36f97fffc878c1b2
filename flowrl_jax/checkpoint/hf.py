"""Hugging Face Qwen2 checkpoints ⇄ NNX model state.

Import streams tensor by tensor: each tensor is read (or, when aligned and of the wanted
dtype, memory-mapped in place) by `safetensors_io.read_tensor` and handed to
`jax.make_array_from_callback`, which places it in its NamedSharding (each device gets only
its slice); no tensor is ever transposed because our layouts are HF's. On a CPU backend an
unsharded tensor is adopted without another copy; peak extra host memory is about one
tensor. Export gathers one tensor at a time and writes sharded safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Names and layouts mirror HF's (Linear weights [out, in]), so a tensor is never transposed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flowrl_jax.checkpoint.safetensors_io import (
    CheckpointError, TensorEntry, TensorSpec, parse_size, read_header, read_tensor, write_file)
from flowrl_jax.config import ConfigError, ModelArch
from flowrl_jax.mesh import logical_axes_of, named_sharding
from flowrl_jax.models.qwen2 import Numerics, Qwen2ForCausalLM, abstract_model, dtype_of

PathLike = Union[str, os.PathLike]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer (and generation) files copied alongside weights on export/convert.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "generation_config.json")
# Non-parameter buffers some older checkpoints carry; HF ignores them too.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(jax.numpy.bfloat16): "bfloat16",
               np.dtype(np.float16): "float16"}


# --------------------------------------------------------------------------- names


def hf_name(path: tuple) -> str:
    """HF tensor name for an NNX param path of the unrolled form (same layout: only the
    prefix differs)."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        parts = ["embed_tokens", "weight"]
    return ".".join(parts if parts[0] == "lm_head" else ["model"] + parts)


def is_stacked(path: tuple) -> bool:
    """Whether an NNX param path is one of the scanned layers' stacked params
    (`layers.stacked.<name>`, leading axis = layer; see qwen2.DecoderStack)."""
    return len(path) > 2 and path[0] == "layers" and path[1] == "stacked"


def hf_names(path: tuple, shape: tuple) -> list[str]:
    """The HF tensor names a param holds: one, or one per layer for a stacked param."""
    if is_stacked(path):
        return [hf_name(("layers", i) + tuple(path[2:])) for i in range(shape[0])]
    return [hf_name(path)]


def hf_tensors(model_or_state: Any) -> Iterable[tuple[str, Any]]:
    """(HF name, array) of every parameter of a model, nnx.State or pure dict, either layer
    form; a stacked param gives one lazily indexed array per layer (nothing is copied until
    the array is read)."""
    for path, arr in _flat_arrays(model_or_state).items():
        names = hf_names(path, tuple(arr.shape))
        if not is_stacked(path):
            yield names[0], arr
            continue
        for i, name in enumerate(names):
            yield name, _LayerOf(arr, i)


class _LayerOf:
    """Layer `i` of a stacked array, read (by `np.asarray` / `_to_host`) only when needed."""

    def __init__(self, stacked: Any, i: int):
        self.stacked, self.i = stacked, i
        self.shape, self.dtype = tuple(stacked.shape[1:]), stacked.dtype

    def get(self) -> Any:
        """The layer's slice (a device array for a jax.Array)."""
        return self.stacked[self.i]

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(jax.device_get(self.get()))
        return out if dtype is None else out.astype(dtype)


@functools.lru_cache(maxsize=16)
def _abstract(arch: ModelArch, num: Numerics) -> tuple[nnx.GraphDef, tuple[tuple[tuple, Any], ...]]:
    # Tracing the model's initialisers takes seconds for big models: do it once per shape.
    graphdef, state = nnx.split(abstract_model(arch, num))
    return graphdef, tuple(nnx.to_flat_state(state))


def expected_params(arch: ModelArch, num: Numerics | None = None) -> list[tuple[tuple, Any]]:
    """(NNX path, abstract Param) for every parameter of the model `arch` describes (read-only)."""
    return list(_abstract(arch, num or Numerics())[1])


# --------------------------------------------------------------------------- reading


def read_arch(hf_dir: PathLike) -> ModelArch:
    """ModelArch from `hf_dir/config.json` (errors name the file)."""
    p = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise CheckpointError(f"{hf_dir}: not a directory")
    if not p.exists():
        raise CheckpointError(f"{p}: missing (not a Hugging Face model directory?)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON: {e}") from e
    try:
        return ModelArch.from_hf_dict(d, source=str(p))
    except KeyError as e:
        raise CheckpointError(f"{p}: missing key {e.args[0]!r}") from e
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def index_tensors(hf_dir: PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a single- or multi-file safetensors checkpoint, headers validated."""
    d = Path(hf_dir)
    idx = d / INDEX_FILE
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: invalid index ({type(e).__name__}: {e})") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (d / f).exists():
                names = [n for n, v in weight_map.items() if v == f]
                raise CheckpointError(f"{d / f}: missing shard (listed in {idx.name} for "
                                      f"{len(names)} tensors, e.g. {names[0]!r})")
    elif (d / SINGLE_FILE).exists():
        files, weight_map = [SINGLE_FILE], None
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
        weight_map = None
        if not files:
            extra = " (PyTorch .bin checkpoints are not supported; re-save with safetensors)" \
                if list(d.glob("*.bin")) else ""
            raise CheckpointError(f"{d}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors{extra}")
    out: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in read_header(d / f).items():
            if name in out:
                raise CheckpointError(f"{d / f}: tensor {name!r} also appears in {out[name].file}")
            out[name] = entry
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in out:
                raise CheckpointError(f"{d / f}: tensor {name!r} listed in {INDEX_FILE} is "
                                      f"not in the file")
    return out


def checkpoint_dtype(hf_dir: PathLike) -> str:
    """The dominant floating dtype of a HF checkpoint's tensors ('float32', 'bfloat16', ...)."""
    counts = Counter()
    for e in index_tensors(hf_dir).values():
        if e.dtype in DTYPE_NAMES:
            counts[DTYPE_NAMES[e.dtype]] += e.nbytes
    return counts.most_common(1)[0][0] if counts else "float32"


def _match(params: list[tuple[tuple, Any]], arch: ModelArch, tensors: dict[str, TensorEntry],
           src: Path) -> list[tuple[tuple, Any, list[TensorEntry]]]:
    """Pair each model param with its checkpoint tensor (a stacked param: one per layer);
    any gap or surplus is an error."""
    plan, seen = [], set()
    for path, var in params:
        full = tuple(var.get_value().shape)
        shape = full[1:] if is_stacked(path) else full
        entries = []
        for name in hf_names(path, full):
            entry = tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{src}: tensor {name!r} is missing (expected shape {shape})")
            if entry.shape != shape:
                raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {entry.shape}, "
                                      f"expected {shape} for this config.json")
            if entry.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, "
                                      f"expected a floating dtype")
            entries.append(entry)
            seen.add(name)
        plan.append((path, var, entries))
    for name, entry in tensors.items():
        if name in seen or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue  # some tied checkpoints also store the (identical) head
        raise CheckpointError(f"{entry.file}: unexpected tensor {name!r} (shape {entry.shape}) "
                              f"that a Qwen2 model with this config.json does not have")
    # Read in file order so the page cache / disk see sequential access.
    plan.sort(key=lambda t: (str(t[2][0].file), t[2][0].start))
    return plan


def place_tensor(entry: TensorEntry, dtype: Any, sharding: Any) -> jax.Array:
    """One checkpoint tensor → a global jax.Array; each device receives only its slice.

    The host copy is `read_tensor`'s read-only aligned array: on a CPU backend an unsharded
    tensor becomes the device buffer as is (for aligned files, the file's own pages).
    """
    host = read_tensor(entry, dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_stacked(entries: list[TensorEntry], dtype: Any, sharding: Any) -> jax.Array:
    """One tensor per layer → a global [layers, ...] jax.Array (a scanned model's stacked
    param). Each device's slice is filled layer by layer from the files: the host holds that
    slice and one tensor at a time, never the whole stack at once (unless one device holds it)."""
    shape = (len(entries),) + tuple(entries[0].shape)

    def fill(index: tuple) -> np.ndarray:
        layers = range(len(entries))[index[0]]
        rest = tuple(index[1:])
        out = None
        for j, i in enumerate(layers):
            part = read_tensor(entries[i], dtype)[rest]
            if out is None:
                out = np.empty((len(layers),) + part.shape, part.dtype)
            out[j] = part
        return out

    return jax.make_array_from_callback(shape, sharding, fill)


def load_hf_state(hf_dir: PathLike, mesh: Mesh, num: Numerics | None = None,
                  ) -> tuple[nnx.GraphDef, nnx.State, ModelArch]:
    """Graphdef, sharded param state and arch of a HF checkpoint directory."""
    num = num or Numerics()
    src = Path(hf_dir)
    arch = read_arch(src)
    graphdef, params = _abstract(arch, num)
    plan = _match(list(params), arch, index_tensors(src), src)
    flat = []
    for path, var, entries in plan:
        v = var.get_value()
        sharding = named_sharding(mesh, logical_axes_of(var), v.shape)
        value = (place_stacked(entries, v.dtype, sharding) if is_stacked(path)
                 else place_tensor(entries[0], v.dtype, sharding))
        flat.append((path, var.replace(value)))
    return graphdef, nnx.from_flat_state(flat), arch


def load_hf(hf_dir: PathLike, mesh: Mesh, num: Numerics | None = None,
            ) -> tuple[Qwen2ForCausalLM, ModelArch]:
    """A Qwen2 model with sharded params from a HF directory (config.json + safetensors)."""
    graphdef, state, arch = load_hf_state(hf_dir, mesh, num)
    return nnx.merge(graphdef, state), arch


def copy_tokenizer(src: PathLike, dst: PathLike) -> list[str]:
    """Copy the tokenizer/generation files present in `src` into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: tokenizer directory not found")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer(d: PathLike) -> bool:
    """Whether directory `d` holds tokenizer files."""
    d = Path(d)
    return (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file() or \
        (d / "tokenizer.model").is_file()


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportSummary:
    """What `export_hf` wrote."""

    out_dir: Path
    params: int
    bytes: int
    dtype: str
    files: tuple[str, ...]
    seconds: float


def _flat_arrays(x: Any) -> dict[tuple, Any]:
    """{path: array} from a model, an nnx.State or a pure nested dict."""
    if isinstance(x, nnx.Module):
        x = nnx.state(x, nnx.Param)
    if isinstance(x, nnx.State):
        x = nnx.to_pure_dict(x)
    out: dict[tuple, Any] = {}

    def walk(node: Any, prefix: tuple) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (int(k) if isinstance(k, str) and k.isdigit() else k,))
        elif node is not None:
            out[prefix] = node.get_value() if isinstance(node, nnx.Variable) else node

    walk(x, ())
    return out


def _to_host(arr: Any) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-host) array to host memory."""
    if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(jax.device_get(arr))


def export_hf(model_or_state: Any, arch: ModelArch, out_dir: PathLike, *,
              dtype: Optional[str] = None, shard_size: Union[int, str] = "5GB",
              tokenizer_dir: Optional[PathLike] = None) -> ExportSummary:
    """Write a HF Qwen2 directory (config.json, generation_config.json, safetensors shards).

    `dtype` None keeps each parameter's own dtype (a bf16 model is written bf16). Only the
    policy LM's parameters are accepted: any other parameter (e.g. a Z-network) is an error.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    arrays = dict(hf_tensors(model_or_state))  # by HF name, whichever layer form is given
    # the HF tensors in the order of the unrolled model's params
    expected = expected_params(arch, Numerics(scan_layers=False))
    specs: list[TensorSpec] = []
    for path, var in expected:
        name = hf_name(path)
        if name not in arrays:
            raise CheckpointError(f"export to {out}: parameter {'.'.join(map(str, path))} "
                                  f"({name}) is missing from the given state")
        arr = arrays.pop(name)
        want = tuple(var.get_value().shape)
        if tuple(arr.shape) != want:
            raise CheckpointError(f"export to {out}: parameter {'.'.join(map(str, path))} has "
                                  f"shape {tuple(arr.shape)}, expected {want} for this arch")
        out_dt = np.dtype(dtype_of(dtype)) if dtype else np.dtype(arr.dtype)
        shape = tuple(arr.shape)

        def fetch(arr=arr, out_dt=out_dt) -> np.ndarray:
            arr = arr.get() if isinstance(arr, _LayerOf) else arr  # a stacked param's layer
            return np.ascontiguousarray(_to_host(arr), dtype=out_dt)

        specs.append(TensorSpec(name, out_dt, shape, fetch))
    if arrays:
        extra = ", ".join(list(arrays)[:5])
        raise CheckpointError(f"export to {out}: {len(arrays)} parameters are not part of the "
                              f"Qwen2 policy ({extra}); pass only the policy model state")

    limit = parse_size(shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for sp in specs:
        if shards[-1] and size + sp.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(sp)
        size += sp.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    dtypes = Counter(sp.dtype for sp in specs)
    main_dtype = DTYPE_NAMES.get(dtypes.most_common(1)[0][0], "float32")

    writer = jax.process_index() == 0
    # Process 0 writes into a staging folder beside `out` and moves the files in at the end,
    # so a failure (disk full, a bad tokenizer dir) leaves no partial export.
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if writer:
        if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
            raise CheckpointError(f"{tokenizer_dir}: tokenizer directory not found")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    try:
        for fname, shard in zip(names, shards):
            if writer:
                write_file(stage / fname, shard)
            else:
                for sp in shard:  # other processes join the gathers
                    sp.fetch()
        if writer:
            if n > 1:
                index = {"metadata": {"total_size": sum(sp.nbytes for sp in specs)},
                         "weight_map": {sp.name: fname for fname, shard in zip(names, shards)
                                        for sp in shard}}
                _write_json(stage / INDEX_FILE, index)
            _write_json(stage / "config.json", arch.to_hf_dict(torch_dtype=main_dtype))
            gen = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
            _write_json(stage / "generation_config.json", gen)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, stage)
            out.mkdir(parents=True, exist_ok=True)
            for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
                old.unlink(missing_ok=True)  # stale shards of an earlier export
            for f in stage.iterdir():
                os.replace(f, out / f.name)
    finally:
        if writer:
            shutil.rmtree(stage, ignore_errors=True)
    return ExportSummary(out, sum(int(np.prod(sp.shape)) for sp in specs),
                         sum(sp.nbytes for sp in specs), main_dtype, tuple(names),
                         time.perf_counter() - t0)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def iter_hf_tensors(hf_dir: PathLike) -> Iterable[tuple[str, np.ndarray]]:
    """(name, host array) for every tensor of a HF checkpoint, one at a time (tests, tools)."""
    for name, e in sorted(index_tensors(hf_dir).items()):
        yield name, np.array(read_tensor(e))
