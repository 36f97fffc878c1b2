"""Comparison report from synthetic run directories: Markdown + PNG files, missing pieces noted."""

import argparse
import json

from flowrl_jax.commands import report as report_cmd
from flowrl_jax.eval import codeforces as cfx
from flowrl_jax.eval import metrics as ev


def _write_run(root, name, acc, with_metrics=True, nested=True):
    run = root / name
    eval_dir = run / "eval" / "step_10" if nested else run / "eval"
    eval_dir.mkdir(parents=True)
    benches = {}
    samples = []
    for b, p in (("aime24", acc), ("math500", acc / 2)):
        flags = {f"q{j}": [1.0 if (i + j) / 8 < p * 2 else 0.0 for i in range(8)] for j in range(3)}
        ss = [{"prompt_id": pid, "sample_index": i, "score": f, "num_tokens": 5,
               "finish_reason": "stop", "text": f"t {i}"}
              for pid, fl in flags.items() for i, f in enumerate(fl)]
        samples += [{**s, "benchmark": b} for s in ss]
        benches[b] = ev.summarize_benchmark(b, ss)
    summary = {"benchmarks": benches, "math_average": ev.math_average(benches),
               "diversity": {"aime24": {"mean": {"distinct_1": acc, "self_bleu": 1 - acc,
                                                 "distinct_correct_paths": 2.0}}},
               "codeforces": cfx.codeforces_summary({"1971A": [True]}, ["1971A"], {"1000": 1}),
               "judge": {"enabled": True, "mean_score": 2.5, "num_scored": 3, "num_failed": 0}}
    (eval_dir / "summary.json").write_text(json.dumps(summary))
    (eval_dir / "samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples))
    if with_metrics:
        lines = [json.dumps({"step": s, "reward/mean": acc * s, "response_length/mean": 100 + s,
                             "kl/ref": 0.01 * s, **({"val/aime24/accuracy": 0.1 * s}
                                                     if s % 2 == 0 else {})})
                 for s in range(5)]
        lines.insert(2, "{not json")
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run, summary


def test_report_markdown_and_pngs(tmp_path):
    a, sa = _write_run(tmp_path, "flowrl", 0.4)
    b, sb = _write_run(tmp_path, "grpo", 0.2, with_metrics=False, nested=False)
    missing = tmp_path / "nothing"
    missing.mkdir()
    out = tmp_path / "out"
    args = argparse.Namespace(runs=[str(a), str(b), str(missing)], out=str(out), labels=None)
    assert report_cmd.run(args) == 0
    md = (out / "report.md").read_text()
    for png in ("pass_at_k_aime24.png", "pass_at_k_math500.png", "diversity.png",
                "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    assert "| run | path | eval dir |" in md and "| flowrl |" in md and "| grpo |" in md
    avg_a = f"{100 * sa['benchmarks']['aime24']['avg_at_n']:.2f}"
    avg_b = f"{100 * sb['benchmarks']['aime24']['avg_at_n']:.2f}"
    assert f"| aime24 | {avg_a} | {avg_b} | – |" in md
    assert "(partial)" in md  # only 2 of the 6 math benchmarks
    assert "pass@8" in md and "pass@16" not in md
    assert "NOT computed" in md and "| 2.5 |" in md
    assert "reward ← `reward/mean`" in md
    assert "flowrl: validation accuracy ← `val/aime24/accuracy`" in md
    assert "metrics.jsonl:3: skipped unparsable line" in md
    assert f"{b}: no metrics.jsonl" in md
    assert f"{missing}: no eval results" in md


def test_report_without_anything_still_writes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "o"
    args = argparse.Namespace(runs=[str(empty)], out=str(out), labels="x,y")
    assert report_cmd.run(args) == 2  # label count mismatch is a clear error
    args.labels = "only"
    assert report_cmd.run(args) == 0
    md = (out / "report.md").read_text()
    assert "No evaluation results found" in md and "No training metrics found" in md
    assert not (out / "training_curves.png").exists()


def test_latest_eval_subdir_in_natural_order(tmp_path):
    from flowrl_jax.eval.report import load_run

    run = tmp_path / "run"
    for step, acc in (("step_200", 0.2), ("step_1000", 0.9), ("step_30", 0.1)):
        d = run / "eval" / step
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"benchmarks": {}, "acc": acc}))
    r = load_run(run)
    assert r.eval_dir.name == "step_1000" and r.summary["acc"] == 0.9



def test_read_metrics_is_the_training_loggers_reader(tmp_path):
    # one reader of metrics.jsonl (flowrl_jax.metrics) for the report and the trainer's tests:
    # a run dir or the file; bad lines skipped, named in `notes` when asked
    from flowrl_jax.eval import report
    from flowrl_jax.run_files import read_metrics

    assert report.read_metrics is read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n\n{"step": 2}\n{"step": 3, "re')
    notes = []
    assert read_metrics(tmp_path, notes=notes) == [{"step": 1}, {"step": 2}]
    assert notes == [f"{tmp_path / 'metrics.jsonl'}:2: skipped non-object line",
                     f"{tmp_path / 'metrics.jsonl'}:5: skipped unparsable line "
                     "(Unterminated string starting at)"]
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]


def _eval_config(run, **over):
    eval_dir = next(p.parent for p in run.rglob("summary.json"))
    cfg = {"model": "m", "model_digest": "d", "n": 8, "temperature": 0.6, "top_p": 0.95,
           "top_k": 0, "max_new_tokens": 64, "limit": None,
           "benchmarks": ["aime24", "math500"], **over}
    (eval_dir / "eval_config.json").write_text(json.dumps(cfg))


def test_unlike_settings_refused_unless_allow_mixed(tmp_path, capsys):
    a, _ = _write_run(tmp_path, "flowrl", 0.4)
    b, _ = _write_run(tmp_path, "grpo", 0.2)
    _eval_config(a)
    _eval_config(b, n=4, limit=3, benchmarks=["math500", "aime24"])  # suite order is no difference
    out = tmp_path / "out"
    args = argparse.Namespace(runs=[str(a), str(b)], out=str(out), labels=None, allow_mixed=False)
    assert report_cmd.run(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--allow-mixed" in err
    assert "n: flowrl=8, grpo=4" in err and "limit: flowrl=None, grpo=3" in err
    assert "benchmarks" not in err and "temperature" not in err
    assert not (out / "report.md").exists()

    args.allow_mixed = True
    assert report_cmd.run(args) == 0
    md = (out / "report.md").read_text()
    assert "Mixed evaluation settings" in md and "`n` differs" in md and "`limit` differs" in md
    assert "| run | n ⚠ | temperature | top_p | top_k | max_new_tokens | limit ⚠ | benchmarks |" in md
    assert "| flowrl | 8 | 0.6 | 0.95 | 0 | 64 | all | aime24,math500 |" in md
    assert "| grpo | 4 | 0.6 | 0.95 | 0 | 64 | 3 | aime24,math500 |" in md


def test_like_settings_report_and_problem_counts(tmp_path):
    a, _ = _write_run(tmp_path, "flowrl", 0.4)
    b, _ = _write_run(tmp_path, "grpo", 0.2)
    _eval_config(a)
    _eval_config(b, model="other", model_digest="e")  # another model is the point of a report
    out = tmp_path / "out"
    args = argparse.Namespace(runs=[str(a), str(b)], out=str(out), labels=None)
    assert report_cmd.run(args) == 0
    md = (out / "report.md").read_text()
    assert "Mixed" not in md and "⚠" not in md
    assert "| benchmark | flowrl | grpo | problems |" in md
    assert md.count(" | 3 |\n") >= 2  # 3 problems in aime24 and math500


def test_problem_count_difference_is_marked(tmp_path):
    from flowrl_jax.eval.report import _problem_counts, load_run

    a, _ = _write_run(tmp_path, "a", 0.4)
    b, _ = _write_run(tmp_path, "b", 0.4)
    s = json.loads((b / "eval" / "step_10" / "summary.json").read_text())
    s["benchmarks"]["aime24"]["num_problems"] = 30
    (b / "eval" / "step_10" / "summary.json").write_text(json.dumps(s))
    assert _problem_counts([load_run(a), load_run(b)], "aime24") == "3 / 30 ⚠"
    assert _problem_counts([load_run(a), load_run(b)], "math500") == "3"
