"""Two processes (2 CPU devices each, jax.distributed): import, export and Orbax save/restore."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _ckpt_util import make_hf
from flowrl_jax.checkpoint import orbax
from flowrl_jax.checkpoint.hf import iter_hf_tensors
from flowrl_jax.mesh import single_device_mesh

WORKER = Path(__file__).with_name("_multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh JAX processes: ~15 s alone, more on a busy machine
def test_two_process_import_export_and_orbax(tmp_path):
    hf_dir, _ = make_hf(tmp_path / "hf", tie=False, kv=2, max_shard_size="60KB")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(hf_dir),
                               str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"process {i} ok" in out, out[-3000:]
    # process 0 wrote a HF copy identical to the input, the Orbax checkpoint restores anywhere
    a, b = dict(iter_hf_tensors(hf_dir)), dict(iter_hf_tensors(tmp_path / "out" / "hf"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    model, _ = orbax.restore_policy(tmp_path / "out" / "ckpt", single_device_mesh())
    assert model.embed_tokens.get_value().tobytes() == a["model.embed_tokens.weight"].tobytes()
