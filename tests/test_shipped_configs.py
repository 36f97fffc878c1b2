"""Every shipped config runs as shipped: one rollout step of `flowrl-jax train` per config in
`configs/`, then `flowrl-jax eval` with its default settings, `sample` and `serve` start-up.

Only what cannot run on a 2-core CPU is overridden: the model (a tiny Qwen2 with the real
Qwen2.5 vocabulary, saved by transformers with the packaged tokenizer), the mesh
(`configs/mesh/cpu.yaml`), batch and length sizes. Every other setting stays as the file has
it: remat, dtypes, attention, reference offload, algorithm, optimizer, rollout options, the
validation sets. A new YAML in `configs/` is picked up without editing this file. (The paper
configs once crashed at their first step because every test overrode `model.remat`.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _sandbox_backends import isolated_here

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Programs are keyed by their own text in the persistent cache, so reuse is exact; the math
# configs compile the same programs once their sizes are overridden.
XLA_CACHE = Path(tempfile.gettempdir()) / "flowrl-jax-shipped-configs-xla-cache"


def _includes(path: Path) -> list[str]:
    inc = (yaml.safe_load(path.read_text()) or {}).get("include", [])
    return [inc] if isinstance(inc, str) else list(inc)


PRESET_DIRS = ("models", "mesh")  # model and mesh presets: parts of configs, not runs


def shipped_yamls() -> list[Path]:
    """Every YAML under configs/ except the model and mesh presets."""
    return sorted(p for p in CONFIGS.rglob("*.yaml")
                  if p.relative_to(CONFIGS).parts[0] not in PRESET_DIRS)


def names_a_model(path: Path) -> bool:
    """Whether a config (with its includes) says which model to train: a run, not a fragment."""
    from flowrl_jax.config import load_yaml_tree

    model = load_yaml_tree(path).get("model") or {}
    return bool(model.get("path") or model.get("preset") or model.get("arch"))


def train_configs() -> list[Path]:
    """The shipped configs that `flowrl-jax train` runs (fragments such as math-base.yaml aside)."""
    return [p for p in shipped_yamls() if names_a_model(p)]


TRAIN_CONFIGS = train_configs()
# demo.yaml runs as shipped, whole (300 steps per algorithm, resumed halfway), in
# test_demo_run.py: one step of it here would only repeat that run's start
ONE_STEP_CONFIGS = [p for p in TRAIN_CONFIGS if p.name != "demo.yaml"]


def cpu_mesh_overrides() -> list[str]:
    """`configs/mesh/cpu.yaml` as overrides (a mesh preset included by a config is replaced)."""
    mesh = yaml.safe_load((CONFIGS / "mesh" / "cpu.yaml").read_text())["mesh"]
    return [f"mesh.{k}={v}" for k, v in mesh.items()]


SIZE_OVERRIDES = [
    "trainer.steps=1",
    "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
    "rollout.decode_slots=4", "rollout.prefill_buckets=[128]",
    "data.max_prompt_length=128", "data.length_buckets=[136]",
    "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
    "trainer.logprob_micro_batch_size=4",
    # validation runs once, on the config's own eval sets, with small sizes
    "trainer.validate_every=1", "eval.limit=1", "eval.max_new_tokens=8",
]


def env(devices: int = 2) -> dict:
    """A CPU subprocess with `devices` local devices, no data-root variable, a shared XLA cache."""
    e = {k: v for k, v in os.environ.items() if k != "FLOWRL_DATA_DIR"}
    e.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(XLA_CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    return e


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`flowrl-jax ARGS` in a fresh process (as a user runs it), output captured."""
    return subprocess.run([sys.executable, "-m", "flowrl_jax.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the Qwen2.5 vocabulary, saved by transformers in bf16 like the
    hub's Qwen2.5 checkpoints, with the packaged Qwen2.5 tokenizer beside it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER

    d = tmp_path_factory.mktemp("qwen-tiny")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=151643, eos_token_id=151643, rope_theta=1e6)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    for f in PACKAGED_TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)
    return d


def test_configs_are_discovered():
    names = {str(p.relative_to(CONFIGS)) for p in TRAIN_CONFIGS}
    # the paper's math recipe for every size, its baselines, the code setting and the demo
    assert {"qwen2.5-0.5b-math.yaml", "qwen2.5-1.5b-math.yaml", "qwen2.5-7b-math.yaml",
            "qwen2.5-32b-math.yaml", "r1-distill-qwen-7b-code.yaml", "demo.yaml",
            "baselines/qwen2.5-7b-math-grpo.yaml"} <= names, names
    # a YAML that names no model must be a fragment that some config includes, never a
    # config that this test would silently pass over
    included = {(f.parent / i).resolve() for f in shipped_yamls() for i in _includes(f)}
    fragments = [p for p in shipped_yamls() if p not in TRAIN_CONFIGS]
    assert [p.name for p in fragments] == ["math-base.yaml"]
    assert all(p.resolve() in included for p in fragments)


def _shipped(path: Path):
    from flowrl_jax.config import load_config

    return load_config(path, [])


@pytest.mark.slow
@pytest.mark.parametrize("config", ONE_STEP_CONFIGS,
                         ids=lambda p: str(p.relative_to(CONFIGS).with_suffix("")))
def test_train_one_step_as_shipped(config, qwen_dir, tmp_path):
    shipped = _shipped(config)
    overrides = cpu_mesh_overrides() + SIZE_OVERRIDES
    if shipped.model.path or shipped.model.preset:  # the demo builds its own tiny model
        overrides.append(f"model.path={qwen_dir}")
    if shipped.task.get("factory"):  # a custom task (the demo) owns its prompts and sizes
        overrides = cpu_mesh_overrides() + ["trainer.steps=1"]
    if not isolated_here():  # code rewards on a machine where nothing isolates (see conftest)
        overrides.append("rewards.sandbox.isolation=best_effort")
    out = tmp_path / "run"
    res = cli("train", "--config", str(config), "--out", str(out), "--no-console", *overrides)
    assert res.returncode == 0, f"{config.name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"

    # the run trained with the shipped settings, not silently different ones
    saved = yaml.safe_load((out / "config.yaml").read_text())
    if not shipped.task.get("factory"):  # the sandbox backend is recorded when code runs
        info = json.loads((out / "run_info.json").read_text())
        assert (info["sandbox_backend"] is not None) == ("code" in config.name), info
    assert saved["model"]["remat"] == shipped.model.remat
    assert saved["model"]["compute_dtype"] == shipped.model.compute_dtype
    assert saved["algo"]["name"] == shipped.algo.name
    assert saved["trainer"]["ref_offload"] == shipped.trainer.ref_offload
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in json.dumps(r)]
    assert train and train[-1]["step"] == 1, records
    assert all(not (isinstance(v, float) and v != v) for v in train[-1].values())  # no NaN
    assert (out / "checkpoints" / "1").is_dir()
    if shipped.trainer.export_hf:
        assert (out / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_eval_with_default_settings(qwen_dir, tmp_path):
    """`flowrl-jax eval` as documented: only the problem count and lengths made small."""
    out = tmp_path / "eval"
    res = cli("eval", "--model", str(qwen_dir), "--out", str(out), "--limit", "1",
              "--max-new-tokens", "8", "--no-progress")
    assert res.returncode == 0, res.stderr[-6000:]
    files = sorted(p.name for p in out.iterdir())
    assert files, "eval wrote nothing"
    summary = [p for p in out.iterdir() if p.suffix == ".json"]
    assert summary, files


def test_sample_starts(qwen_dir):
    res = cli("sample", "--model", str(qwen_dir), "--prompt", "1 + 1 =", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip(), "sample printed nothing"


def test_serve_starts_and_answers(qwen_dir):
    pytest.importorskip("jetstream", reason="google-jetstream is installed by `make venv`")
    proc = subprocess.Popen([sys.executable, "-m", "flowrl_jax.cli", "serve", "--model",
                             str(qwen_dir), "--port", "0", "--max-new-tokens", "16"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, port = time.time() + 180, None
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"listening on [^ ]*:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, f"serve did not start (exit {proc.poll()})"
        from flowrl_jax.sampling.jetstream_client import request

        done = request(f"127.0.0.1:{port}", text="1 + 1 =", max_tokens=4, timeout=120)
        assert 1 <= len(done.token_ids) <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
