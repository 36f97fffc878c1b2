"""The eval pipeline (chunking, scoring, resume, outputs) with a fake deterministic backend."""

import json
import random

import pytest

from flowrl_jax.eval.records import SAMPLE_KEYS, EvalError, Generation, Problem
from flowrl_jax.eval.runner import run_eval
from flowrl_jax.eval.scoring import Scorer
from flowrl_jax.eval.suites import SUITES, parse_diversity, parse_suite


class FakeBackend:
    """Deterministic in (prompt, seed, sample): a resumed run must reproduce the same text."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, seed):
        self.calls.append((len(prompts), n, seed))
        out = []
        for i, p in enumerate(prompts):
            for j in range(n):
                rng = random.Random(f"{p}|{seed}|{j}")
                ans = rng.choice(["7", "8"])
                k = rng.randint(1, 30)
                out.append(Generation(i, j, f"{p} thinking {k} Answer: {ans}", k,
                                             "length" if k > 25 else "stop"))
        random.Random(seed).shuffle(out)  # engines may return samples in any order
        return out


def fake_score(data_source, text, gt):
    return 1.0 if text.endswith(f"Answer: {gt}") else 0.0


def _problems():
    probs = []
    for b, k in (("aime24", 5), ("math500", 3), ("gsm8k", 2)):
        probs += [Problem(b, f"{b}-{i}", f"q{b}{i}", "7", "math") for i in range(k)]
    return probs


def _run(tmp, backend, config=None):
    return run_eval(_problems(), backend, tmp, n=4, seed=3, batch_prompts=2,
                           scorer=Scorer(0, fake_score),
                           config=config or {"model": "fake", "n": 4, "seed": 3},
                           diversity_on=("aime24",))


def test_run_eval_outputs_and_resume(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    b1 = FakeBackend()
    full = _run(full_dir, b1)
    assert len(b1.calls) == 3 + 2 + 1  # ceil(5/2) + ceil(3/2) + 1 chunks
    lines = (full_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == (5 + 3 + 2) * 4
    rec = json.loads(lines[0])
    assert set(SAMPLE_KEYS) <= set(rec)
    # scores agree with an independent recount from the written samples
    recs = [json.loads(x) for x in lines]
    aime = [r for r in recs if r["benchmark"] == "aime24"]
    per = {}
    for r in aime:
        per.setdefault(r["prompt_id"], []).append(r["text"].endswith("Answer: 7"))
    expect = sum(sum(v) / len(v) for v in per.values()) / len(per)
    assert full["benchmarks"]["aime24"]["avg_at_n"] == pytest.approx(expect)
    assert 0 < expect < 1
    assert full["math_average"]["missing"] == ["aime25", "amc23", "minerva_math", "olympiadbench"]
    assert "diversity" in full and "aime24" in full["diversity"]
    for f in ("summary.json", "results.md", "aime24.md", "math500.md", "gsm8k.md",
              "eval_config.json"):
        assert (full_dir / f).is_file(), f
    assert "| aime24 | 5 | 4 |" in (full_dir / "results.md").read_text()

    # simulate a kill: keep 13 finished lines plus a torn half line
    part_dir.mkdir()
    (part_dir / "samples.jsonl").write_text("\n".join(lines[:13]) + "\n" + lines[13][:20])
    b2 = FakeBackend()
    resumed = _run(part_dir, b2)
    summ = json.loads((part_dir / "summary.json").read_text())
    assert summ["new_samples"] == 40 - 13  # finished samples are never recomputed
    assert len(b2.calls) < len(b1.calls)  # whole finished chunks are skipped
    assert resumed["benchmarks"] == full["benchmarks"]
    assert resumed["diversity"] == full["diversity"]
    got = sorted((part_dir / "samples.jsonl").read_text().splitlines())
    assert got == sorted(lines)

    # a third run has nothing left to do
    b3 = FakeBackend()
    _run(part_dir, b3)
    assert b3.calls == []


def test_resume_with_other_settings_refused(tmp_path):
    _run(tmp_path, FakeBackend())
    with pytest.raises(EvalError, match=r"settings differ .*\['n'\]"):
        _run(tmp_path, FakeBackend(), config={"model": "fake", "n": 8, "seed": 3})


def test_parse_suite_and_diversity():
    assert parse_suite("math") == list(SUITES["math"])
    assert parse_suite("code,aime24,aime24") == ["livecodebench", "humanevalplus",
                                                 "codeforces", "aime24"]
    with pytest.raises(EvalError, match="'aime23'"):
        parse_suite("aime23")
    assert parse_diversity("none") == [] and parse_diversity("aime24, math500") == [
        "aime24", "math500"]
    assert "gsm8k" in parse_diversity("all")
    with pytest.raises(EvalError, match=r"--diversity: unknown benchmark\(s\) \['x'\]"):
        parse_diversity("aime24,x")


def test_cli_data_root_comes_from_the_data_registry(tmp_path, capsys, monkeypatch):
    # eval resolves its data root with data.registry.resolve_data_dir (no private fallback)
    from flowrl_jax.cli import main

    model = tmp_path / "m"
    model.mkdir()
    monkeypatch.setenv("FLOWRL_DATA_DIR", str(tmp_path / "nope"))
    base = ["eval", "--model", str(model), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "nope is not a directory" in capsys.readouterr().err
    # --data-dir wins over the environment
    assert main(base + ["--data-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "other is not a directory" in err and "nope" not in err


def test_scorer_pool_runs_in_processes():
    s = Scorer(2, fake_score)
    try:
        futs = [s.submit("math", f"x Answer: {a}", "7") for a in ("7", "8", "7")]
        assert [f.result(timeout=60) for f in futs] == [1.0, 0.0, 1.0]
    finally:
        s.close()


def test_judge_scores_land_in_summary(tmp_path):
    from test_judge import _FakeServer

    from flowrl_jax.eval import judge as jg

    server = _FakeServer()
    try:
        server.replies = [(200, "Score: 2"), (200, "Score: 4")] + [(200, "Score: 1")] * 10
        cfg = jg.JudgeConfig(url=server.url, retries=1, backoff_s=0.0)
        out = run_eval(_problems()[:2], FakeBackend(), tmp_path, n=3, seed=0,
                              batch_prompts=2, scorer=Scorer(0, fake_score),
                              config={"model": "fake"}, diversity_on=("aime24",), judge_cfg=cfg)
    finally:
        server.close()
    assert len(server.requests) == 2  # one request per judged problem
    assert out["judge"]["mean_score"] == 3.0 and out["judge"]["num_scored"] == 2
    user_msg = server.requests[0]["body"]["messages"][1]["content"]
    assert "Solution 3:" in user_msg and "Solution 4:" not in user_msg
    assert "LLM-judge diversity (1–5): 3.0" in (tmp_path / "results.md").read_text()


def test_scoring_failure_names_the_sample(tmp_path):
    def boom(data_source, text, gt):
        raise KeyError("no reward for 'mystery'")

    with pytest.raises(EvalError, match=r"scoring aime24 aime24-0 sample \d .*mystery"):
        run_eval(_problems()[:1], FakeBackend(), tmp_path, n=2, seed=0, batch_prompts=1,
                        scorer=Scorer(0, boom), config={"model": "fake"})


def test_cli_bad_input_clear_errors(tmp_path, capsys, monkeypatch):
    from flowrl_jax.cli import main

    model = tmp_path / "m"
    model.mkdir()
    base = ["eval", "--model", str(model), "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)]
    cases = [(["--suite", "aime23"], "unknown benchmark 'aime23'"),
             (["--diversity", "foo"], "--diversity: unknown benchmark(s) ['foo']"),
             (["--n", "0"], "--n must be >= 1"),
             (["--limit", "0"], "--limit must be >= 1"),
             (["--judge"], "--judge needs FLOWRL_JUDGE_URL"),
             (["--cf-standings", str(tmp_path / "none.json")], "--cf-standings")]
    monkeypatch.delenv("FLOWRL_JUDGE_URL", raising=False)
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 "--data-dir", str(tmp_path)]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_samples_hit_disk_while_the_next_chunk_generates(tmp_path):
    import concurrent.futures as cf
    import time

    class ThreadScorer:
        def __init__(self):
            self.pool = cf.ThreadPoolExecutor(2)

        def submit(self, ds, text, gt):
            return self.pool.submit(fake_score, ds, text, gt)

        def close(self):
            self.pool.shutdown()

    seen = []

    class WatchingBackend(FakeBackend):
        def generate(self, prompts, n, seed):
            if self.calls:  # wait (bounded) for the previous chunk's scored samples
                path = tmp_path / "samples.jsonl"
                deadline = time.time() + 10
                while time.time() < deadline and len(path.read_text().splitlines()) < 8:
                    time.sleep(0.01)
                seen.append(len(path.read_text().splitlines()))
            return super().generate(prompts, n, seed)

    scorer = ThreadScorer()
    try:
        run_eval(_problems()[:4], WatchingBackend(), tmp_path, n=4, seed=0,
                        batch_prompts=2, scorer=scorer, config={"model": "fake"},
                        show_progress=True)  # rich bar advanced from scoring threads
    finally:
        scorer.close()
    assert seen == [8]  # chunk 1 (2 prompts × 4) was on disk before chunk 2 finished


def test_self_bleu_variant_reaches_summary_and_results(tmp_path):
    run_eval(_problems(), FakeBackend(), tmp_path, n=4, seed=3, batch_prompts=2,
             scorer=Scorer(0, fake_score), config={"model": "fake"}, diversity_on=("aime24",),
             self_bleu="texygen")
    summ = json.loads((tmp_path / "summary.json").read_text())
    assert summ["diversity"]["aime24"]["self_bleu_variant"].startswith("texygen: BLEU-3")
    assert "self_bleu: texygen: BLEU-3" in (tmp_path / "results.md").read_text()
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(r["gold"] == "7" for r in rows)
    assert all(r["extracted"] == r["text"].rsplit("Answer: ", 1)[1] for r in rows)
    assert {r["extracted"] for r in rows} == {"7", "8"}
