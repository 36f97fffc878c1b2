"""safetensors_io.read_tensor: zero-copy mapping of aligned tensors, aligned copies of
misaligned ones, casts, truncation errors, 64-byte aligned export, and imported params that
survive the source directory being overwritten."""

import json
import mmap
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from flowrl_jax.checkpoint.hf import export_hf, load_hf
from flowrl_jax.checkpoint.safetensors_io import (
    CheckpointError, TensorSpec, read_header, read_tensor, write_file)
from flowrl_jax.mesh import single_device_mesh

from _ckpt_util import make_hf


def write_padded(path, tensors: dict[str, np.ndarray], data_start_mod_64: int) -> None:
    """A valid safetensors file whose data starts at `data_start_mod_64` modulo 64."""
    header, off = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": {"float32": "F32", "bfloat16": "BF16"}[a.dtype.name],
                        "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * ((data_start_mod_64 - 8 - len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in tensors.values():
            f.write(a.tobytes())


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((48, 32)).astype(np.float32),
            "b": rng.standard_normal((16,)).astype(np.float32)}


def _is_zero_copy(host: np.ndarray) -> bool:
    return jax.device_put(host, jax.devices()[0]).unsafe_buffer_pointer() == host.ctypes.data


def _root_buffer(arr: np.ndarray) -> mmap.mmap:
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


@pytest.mark.parametrize("start", [0, 8, 32])
def test_read_tensor_values_alignment_and_zero_copy(tmp_path, tensors, start):
    path = tmp_path / "m.safetensors"
    write_padded(path, tensors, start)
    entries = read_header(path)
    assert entries["a"].start % 64 == start
    for name, want in tensors.items():
        got = read_tensor(entries[name])
        np.testing.assert_array_equal(got, want)
        assert got.ctypes.data % 64 == 0 and not got.flags.writeable
        assert _is_zero_copy(got)  # jax adopts the host array as the CPU device buffer
        root = _root_buffer(got)
        assert isinstance(root, mmap.mmap)
        # aligned: a mapping of the file itself (from the page holding the tensor's start);
        # misaligned: a private copy that starts with the tensor's own bytes
        head = bytes(memoryview(root)[:8])
        if start == 0:
            page = entries[name].start - entries[name].start % mmap.ALLOCATIONGRANULARITY
            assert head == path.read_bytes()[page:page + 8]
        else:
            assert head == want.tobytes()[:8]


def test_read_tensor_casts(tmp_path, tensors):
    path = tmp_path / "m.safetensors"
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    write_padded(path, bf, 0)
    got = read_tensor(read_header(path)["a"], np.float32)
    assert got.dtype == np.float32 and not got.flags.writeable
    np.testing.assert_array_equal(got, bf["a"].astype(np.float32))


@pytest.mark.parametrize("start", [0, 8])
def test_truncated_after_header_names_tensor(tmp_path, tensors, start):
    path = tmp_path / "m.safetensors"
    write_padded(path, tensors, start)
    entries = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(entries["a"].start + 100)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated .*tensor 'a'"):
        read_tensor(entries["a"])


def test_export_is_64_byte_aligned_and_readable_by_safetensors(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    write_file(path, [TensorSpec(n, a.dtype, a.shape, lambda a=a: a) for n, a in tensors.items()])
    entries = read_header(path)
    assert all(e.start % 64 == 0 for e in entries.values())
    with safe_open(str(path), "np") as f:
        for n, a in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(n), a)


def test_loaded_params_survive_overwriting_their_source(tmp_path):
    """Import maps the file's pages: exporting over the same directory (atomic renames) must
    leave the already-loaded model intact and readable."""
    src, _ = make_hf(tmp_path / "src", tie=False)
    d = tmp_path / "model"
    model, arch = load_hf(src, single_device_mesh())
    export_hf(model, arch, d)
    loaded, _ = load_hf(d, single_device_mesh())
    before = np.asarray(loaded.layers[0].mlp.up_proj.weight.get_value()).copy()
    scaled = jax.tree.map(lambda x: x * 2, model)
    export_hf(scaled, arch, d)  # overwrite the files the loaded params alias
    after = np.asarray(loaded.layers[0].mlp.up_proj.weight.get_value())
    np.testing.assert_array_equal(after, before)
    reread, _ = load_hf(d, single_device_mesh())
    np.testing.assert_array_equal(np.asarray(reread.layers[0].mlp.up_proj.weight.get_value()), 2 * before)
