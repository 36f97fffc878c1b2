"""`flowrl-jax convert` end to end in subprocesses: HF → Orbax → HF, bit-exact, with tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from transformers import AutoModelForCausalLM

from _ckpt_util import hf_logits, make_hf
from flowrl_jax.checkpoint.hf import iter_hf_tensors
from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "flowrl_jax.cli", "convert", *args],
                          capture_output=True, text=True, env=env, timeout=180)


def test_convert_cli_round_trip(tmp_path):
    hf, ref = make_hf(tmp_path / "hf", tie=False, kv=2, max_shard_size="60KB")
    r = cli("hf-to-orbax", "--hf", str(hf), "--out", str(tmp_path / "run" / "checkpoints"),
            "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "hf-to-orbax:" in r.stdout and "float32" in r.stdout and "MB/s" in r.stdout
    # --ckpt RUN/checkpoints (here: the run dir itself) exports the latest step
    r = cli("orbax-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
            "--tokenizer", str(PACKAGED_TOKENIZER), "--shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert "orbax-to-hf:" in r.stdout and "step 0" in r.stdout
    a, b = dict(iter_hf_tensors(hf)), dict(iter_hf_tensors(tmp_path / "out"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    assert (tmp_path / "out" / "vocab.json").exists() and (tmp_path / "out" / "merges.txt").exists()
    ids = np.arange(10)[None] * 7 % 128
    out_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.array_equal(hf_logits(out_model, ids), hf_logits(ref, ids))
    # bad input: a clear one-line error and exit status 2 (cli.main prints FlowRLErrors)
    r = cli("orbax-to-hf", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "missing: checkpoint directory does not exist" in r.stderr
    assert "Traceback" not in r.stderr
