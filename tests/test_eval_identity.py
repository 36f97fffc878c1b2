"""Evaluation identity (issue 17): an eval resumes only onto the same model — a re-exported HF
directory or a newer checkpoint step at the same path is refused (or, with --overwrite,
evaluated afresh) — and samples.jsonl rows carry the gold and the extracted answer."""

from __future__ import annotations

import json

import pytest

from flowrl_jax.data.registry import PACKAGED_DATA_DIR
from flowrl_jax.eval import identity
from flowrl_jax.eval.records import EvalError
from flowrl_jax.eval.resume import check_config
from flowrl_jax.eval.scoring import extracted_answer, gold_answer
from flowrl_jax.testing import tiny_arch, tiny_model
from test_eval_e2e import char_tokenizer


def _export(d, seed):
    from flowrl_jax.checkpoint.hf import export_hf

    arch = tiny_arch(128, max_position_embeddings=1024, eos_token_id=2)
    export_hf(tiny_model(arch, seed=seed, scale=1.0), arch, d)
    char_tokenizer().save_pretrained(d)


def test_hf_identity_follows_the_weights(tmp_path):
    _export(tmp_path, seed=0)
    a = identity.model_identity(tmp_path)
    assert a == identity.model_identity(tmp_path)  # deterministic
    assert a["kind"] == "hf" and a["weights"] and all(w["size"] > 0 for w in a["weights"])
    _export(tmp_path, seed=1)  # same path, same shapes and sizes, new weights
    b = identity.model_identity(tmp_path)
    assert [w["size"] for w in a["weights"]] == [w["size"] for w in b["weights"]]
    assert [w["header_sha256"] for w in a["weights"]] == [w["header_sha256"] for w in b["weights"]]
    assert a["digest"] != b["digest"]  # only the content checksum tells them apart


def test_sampled_checksum_of_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 1 << 20)
    p = tmp_path / "w.bin"
    data = bytearray(4 << 20)
    p.write_bytes(bytes(data))
    a = identity.content_checksum(p)
    assert a.startswith("sampled256x65536:")
    data[-1] = 7  # the last block is always read
    p.write_bytes(bytes(data))
    assert identity.content_checksum(p) != a


def test_orbax_identity_records_the_resolved_step(tmp_path):
    from flowrl_jax.checkpoint.orbax import save_policy

    arch = tiny_arch(64)
    run = tmp_path / "run"
    save_policy(run / "checkpoints", tiny_model(arch, seed=0), arch, step=3)
    a = identity.model_identity(run)  # a run directory resolves to RUN/checkpoints
    assert a["kind"] == "orbax" and a["step"] == 3
    save_policy(run / "checkpoints", tiny_model(arch, seed=1), arch, step=6)
    b = identity.model_identity(run / "checkpoints")
    assert b["step"] == 6 and b["digest"] != a["digest"]
    cfg = {"model": str(run), "model_digest": a["digest"], "model_step": 3, "n": 2}
    (tmp_path / "out").mkdir()
    check_config(tmp_path / "out", cfg)
    with pytest.raises(EvalError, match=r"model changed .*model_digest', 'model_step'.*--overwrite"):
        check_config(tmp_path / "out", {**cfg, "model_digest": b["digest"], "model_step": 6})


def test_recorded_only_keys_update_and_old_configs_are_refused(tmp_path):
    check_config(tmp_path, {"model_digest": "x", "n": 2, "benchmarks": ["aime24"], "limit": 3})
    check_config(tmp_path, {"model_digest": "x", "n": 2, "benchmarks": ["math500"], "limit": None})
    saved = json.loads((tmp_path / "eval_config.json").read_text())
    assert saved["benchmarks"] == ["math500"] and saved["limit"] is None
    (tmp_path / "eval_config.json").write_text(json.dumps({"model": "m", "n": 2}))
    with pytest.raises(EvalError, match="before evals recorded the model's digest"):
        check_config(tmp_path, {"model": "m", "model_digest": "x", "n": 2})


def test_gold_and_extracted_answers():
    assert gold_answer("204") == "204" and gold_answer(18) == "18"
    assert gold_answer({"tests": []}) is None
    assert extracted_answer("so \\boxed{\\frac{1}{2}} and \\boxed{ 7 }", "7") == "7"
    assert extracted_answer("... Answer: 12", "12") == "12"
    assert extracted_answer("no answer", "12") is None
    assert extracted_answer("```python\nprint(1)\n```", {"tests": []}) is None


def _eval(model_dir, out, *extra):
    from flowrl_jax.cli import main

    return main(["eval", "--model", str(model_dir), "--suite", "aime24", "--limit", "2",
                 "--n", "2", "--max-new-tokens", "4", "--out", str(out), "--data-dir",
                 str(PACKAGED_DATA_DIR), "--score-workers", "0", "--prefill-buckets", "1024",
                 "--decode-slots", "4", "--decode-chunk", "4", "--no-progress", *extra])


@pytest.mark.slow
def test_eval_after_retrain_is_refused_then_overwritten(tmp_path, capsys):
    model, out = tmp_path / "hf", tmp_path / "eval"
    _export(model, seed=0)
    assert _eval(model, out) == 0
    first = json.loads((out / "eval_config.json").read_text())
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["gold"] is not None and "extracted" in r for r in rows)
    assert first["model_identity"]["weights"] and first["benchmarks"] == ["aime24"]
    capsys.readouterr()

    _export(model, seed=1)  # "more training" re-exported the same directory
    assert _eval(model, out) == 2
    err = capsys.readouterr().err
    assert "model changed" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "eval_config.json").read_text()) == first  # nothing touched

    assert _eval(model, out, "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["new_samples"] == 4  # re-evaluated, not the old table
    assert json.loads((out / "eval_config.json").read_text())["model_digest"] != first["model_digest"]


def test_bad_temperature_refused_before_out_is_written(tmp_path, capsys):
    from flowrl_jax.cli import main

    model = tmp_path / "m"
    model.mkdir()
    out = tmp_path / "o"
    assert main(["eval", "--model", str(model), "--out", str(out), "--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err
    assert not out.exists()
