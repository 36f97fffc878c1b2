"""Bad input fails before any compute, as one line naming the culprit with exit code 2, and a
failed command leaves no partial output (issue 17)."""

import json
from pathlib import Path

import pytest

from flowrl_jax import cli
from flowrl_jax.config import load_config
from flowrl_jax.errors import SandboxError
from flowrl_jax.rewards import sandbox
from flowrl_jax.rl.task import DataTask
from flowrl_jax.data.tokenizer import PACKAGED_TOKENIZER

TINY = ["model.preset=tiny", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "trainer.mini_batch_size=4", "trainer.micro_batch_size=2"]


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if " INFO " not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


def _train(out: Path, *overrides: str) -> int:
    return cli.main(["train", "--config", "/dev/null", "--out", str(out), "--no-console",
                     *TINY, *overrides])


def test_unregistered_data_source_fails_before_the_first_rollout(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n')
    rc = _train(tmp_path / "run", f"data.custom=[{{name: mine, path: {data}, data_source: nope}}]",
                "data.train=[mine]")
    assert rc == 2
    _one_line_error(capsys, "data.custom (mine).data_source", "'nope'", "math_dapo")
    assert not (tmp_path / "run").exists()  # no half-made run directory


def test_unknown_validation_set_fails_before_compute(tmp_path, capsys):
    assert _train(tmp_path / "run", "data.train=[gsm8k]", "trainer.validate_every=1",
                  "eval.sets=[no_such_set]") == 2
    _one_line_error(capsys, "eval.sets", "'no_such_set'")
    assert not (tmp_path / "run").exists()


def test_code_rewards_refused_before_compute_where_nothing_isolates(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "ISOLATING_BACKENDS", ())  # simulate an unisolated machine
    assert _train(tmp_path / "run", "data.train=[code_train]") == 2
    _one_line_error(capsys, "no isolating backend", "rewards.sandbox.isolation: required",
                    "apt install bubblewrap", "best_effort")
    assert not (tmp_path / "run").exists()


def test_default_jetstream_backend_without_jetstream_names_the_fix(tmp_path, capsys,
                                                                monkeypatch):
    import sys

    # None in sys.modules: importing the JetStream rollouts raises ImportError, as without
    # google-jetstream
    monkeypatch.setitem(sys.modules, "flowrl_jax.sampling.jetstream_rollout", None)
    assert _train(tmp_path / "run") == 2
    _one_line_error(capsys, "rollout.backend", "google-jetstream", "make venv",
                    "rollout.backend=engine")
    assert not (tmp_path / "run").exists()


def test_code_task_records_its_sandbox_backend(monkeypatch):
    cfg = load_config(None, TINY + ["data.train=[code_train]", "rewards.sandbox.isolation=best_effort"])
    monkeypatch.setattr(sandbox, "ISOLATING_BACKENDS", ())
    task = DataTask(cfg)
    try:
        task.check()
    except SandboxError as exc:  # root, and uid 65534 cannot reach the interpreter: refused
        assert "isolation='plain'" in str(exc)
    else:
        assert task.run_info() == {"sandbox_backend": "plain", "sandbox_isolation": "best_effort"}
    math_task = DataTask(load_config(None, TINY + ["data.train=[gsm8k]"]))
    math_task.check()  # no code rewards: no sandbox needed, none probed
    assert math_task.run_info()["sandbox_backend"] is None


def test_missing_tokenizer_fails_before_compute(tmp_path, capsys):
    assert _train(tmp_path / "run", f"model.tokenizer={tmp_path / 'no-tok'}") == 2
    _one_line_error(capsys, "model.tokenizer", "no-tok")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_train_out_naming_a_file(tmp_path, capsys, out):
    (tmp_path / "afile").write_text("x")
    assert _train(tmp_path / out, "task.factory=trainer_toy:ToyTask") == 2
    _one_line_error(capsys, "--out", "is a file, not a directory")


def test_train_with_garbage_model_directories(tmp_path, capsys):
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("garbage")
    assert _train(tmp_path / "r1", "task.factory=trainer_toy:ToyTask", "model.preset=null",
                  f"model.path={bad_json}") == 2
    _one_line_error(capsys, "model.path", "config.json")
    # a readable config.json beside garbage weights: the headers are checked before compute
    bad_weights = tmp_path / "bad_weights"
    bad_weights.mkdir()
    (bad_weights / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True}))
    (bad_weights / "model.safetensors").write_bytes(b"\xff" * 100)
    assert _train(tmp_path / "r2", "task.factory=trainer_toy:ToyTask", "model.preset=null",
                  f"model.path={bad_weights}") == 2
    _one_line_error(capsys, "model.path", "model.safetensors")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- convert


def _convert(*args: str) -> int:
    return cli.main(["convert", *args])


def test_convert_shard_size_banana(tmp_path, capsys):
    assert _convert("orbax-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--shard-size", "banana") == 2
    _one_line_error(capsys, "--shard-size", "banana")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_convert_negative_step(tmp_path, capsys, direction):
    src = ["--hf", str(tmp_path)] if direction == "hf-to-orbax" else ["--ckpt", str(tmp_path)]
    assert _convert(direction, *src, "--out", str(tmp_path / "o"), "--step", "-3") == 2
    _one_line_error(capsys, "--step", "-3")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_convert_out_naming_a_file(tmp_path, capsys, direction):
    (tmp_path / "afile").write_text("x")
    src = ["--hf", str(tmp_path)] if direction == "hf-to-orbax" else ["--ckpt", str(tmp_path)]
    assert _convert(direction, *src, "--out", str(tmp_path / "afile")) == 2
    _one_line_error(capsys, "--out", "is a file")


def test_orbax_to_hf_checks_the_tokenizer_before_reading_or_writing(tmp_path, capsys):
    # the checkpoint does not even exist: the tokenizer is the first thing checked
    empty = tmp_path / "empty"
    empty.mkdir()
    for tok, why in ((tmp_path / "nope", "not a directory"), (empty, "no tokenizer files")):
        assert _convert("orbax-to-hf", "--ckpt", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o"), "--tokenizer", str(tok)) == 2
        _one_line_error(capsys, "--tokenizer", why)
    assert not (tmp_path / "o").exists()


def test_a_failed_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    from flowrl_jax.checkpoint import hf
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.config import ModelArch
    from flowrl_jax.errors import CheckpointError
    from flowrl_jax.mesh import single_device_mesh

    arch = ModelArch(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = random_model(arch, None, single_device_mesh())
    out = tmp_path / "hf"
    real, written = hf.write_file, []

    def disk_full_on_second_shard(path, specs, *a, **k):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(path, specs, *a, **k)

    monkeypatch.setattr(hf, "write_file", disk_full_on_second_shard)
    with pytest.raises(OSError, match="No space"):
        hf.export_hf(model, arch, out, shard_size="2KB")
    assert written and not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(hf, "write_file", real)
    with pytest.raises(CheckpointError, match="tokenizer directory not found"):
        hf.export_hf(model, arch, out, tokenizer_dir=tmp_path / "no-tok")
    assert list(tmp_path.iterdir()) == []
    s = hf.export_hf(model, arch, out, shard_size="2KB", tokenizer_dir=PACKAGED_TOKENIZER)
    assert len(s.files) > 1 and (out / "vocab.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left
