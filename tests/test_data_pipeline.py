"""Tokenizer, templates, truncation, G-fold groups, epochs, host sharding and resumable state."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flowrl_jax.config import Config, DataConfig
from flowrl_jax.data import (DataError, Record, apply_template, build_train_pipeline,
                             load_dataset, load_tokenizer, save_iterator)
from flowrl_jax.data.registry import PACKAGED_DATA_DIR

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = PACKAGED_DATA_DIR  # the copy inside the package, whatever $FLOWRL_DATA_DIR says

# SPEC §3, typed here independently of flowrl_jax.data.templates.
SPEC_MATH = ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
             "to the problem.\n\n{problem}\n\nRemember to put your answer on its own line after "
             "\"Answer:\".")
QWEN25_SPECIALS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
    "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
    "<|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> "
    "<|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>").split()
PAD = 151643


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def aime24():
    return load_dataset("aime24", DATA_DIR).records


def _cfg(**kw) -> DataConfig:
    base = dict(train=("aime24",), data_dir=str(DATA_DIR), max_prompt_length=512,
                length_buckets=(64, 128, 256))
    base.update(kw)
    return DataConfig(**base)


def _reference_ids(tok, problem: str, chat: bool = True) -> list[int]:
    """Token ids computed the slow, obvious way (per-message Jinja render)."""
    text = SPEC_MATH.format(problem=problem)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _rows(batch):
    """(id, unpadded token ids) per row."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        m = batch["attention_mask"][i].astype(bool)
        out.append((batch["id"][i], batch["input_ids"][i][m].tolist()))
    return out


def test_packaged_tokenizer_ids(tok):
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids(QWEN25_SPECIALS) == list(range(151643, 151665))
    assert len(tok) == 151665 and tok.pad_token_id == PAD
    assert tok.encode("<|im_start|>user\n", add_special_tokens=False) == [151644, 872, 198]


def test_math_template_and_chat_template(tok, aime24):
    it = build_train_pipeline(_cfg(shuffle=False), tok, 1, 2, process_index=0, process_count=1)
    b = next(it)
    rec = aime24[0]
    assert b["id"][0] == rec.id and b["prompt"][0] == rec.prompt
    text = b["prompt_text"][0]
    assert SPEC_MATH.format(problem=rec.prompt) in text
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert _rows(b)[0][1] == _reference_ids(tok, rec.prompt)
    raw = build_train_pipeline(_cfg(shuffle=False, chat_template=False), tok, 1, 2,
                               process_index=0, process_count=1)
    rb = next(raw)
    assert rb["prompt_text"][0] == SPEC_MATH.format(problem=rec.prompt)
    assert "<|im_start|>" not in rb["prompt_text"][0]
    assert _rows(rb)[0][1] == _reference_ids(tok, rec.prompt, chat=False)


def test_code_templates():
    lcb = load_dataset("livecodebench", DATA_DIR).records
    stdin = next(r for r in lcb if not r.ground_truth["starter_code"])
    starter = next(r for r in lcb if r.ground_truth["starter_code"])
    s = apply_template(stdin)
    assert s.startswith("You are an expert Python programmer. You will be given a question "
                        "(problem specification)")
    assert stdin.prompt in s and "### Format: Read the inputs from stdin" in s
    assert "```python\n# YOUR CODE HERE\n```" in s
    assert s.endswith("### Answer: (use the provided format with backticks)\n\n")
    t = apply_template(starter)
    assert "### Format: You will use the following starter code" in t
    assert f"```python\n{starter.ground_truth['starter_code']}\n```" in t
    he = load_dataset("humaneval", DATA_DIR, limit=1).records[0]
    h = apply_template(he)
    assert "Complete the following Python function" in h and he.prompt.rstrip() in h
    assert apply_template(he, "none") == he.prompt


def test_left_truncation_keeps_the_end(tok, aime24):
    n = 48
    it = build_train_pipeline(_cfg(shuffle=False, max_prompt_length=n), tok, 1, 4,
                              process_index=0, process_count=1)
    b = next(it)
    assert b["input_ids"].shape == (4, n)  # every bucket exceeds 48: padded to max length
    for (rid, ids), rec in zip(_rows(b), aime24[:4]):
        full = _reference_ids(tok, rec.prompt)
        assert rid == rec.id and len(full) > n
        assert ids == full[-n:]
        assert ids[-3:] == [151644, 77091, 198]  # "<|im_start|>assistant\n" survives
    assert b["truncated"].all()


def test_filter_mode_drops_and_counts(tok, aime24):
    lens = {r.id: len(_reference_ids(tok, r.prompt)) for r in aime24}
    limit = int(np.median(list(lens.values())))
    too_long = {k for k, v in lens.items() if v > limit}
    assert 0 < len(too_long) < len(aime24)
    it = build_train_pipeline(_cfg(truncation="filter", max_prompt_length=limit, num_epochs=1),
                              tok, 1, 1, process_index=0, process_count=1)
    assert it.info.num_filtered == len(too_long) and set(it.info.filtered_ids) == too_long
    seen = [bid for b in it for bid in b["id"]]
    assert sorted(seen) == sorted(set(lens) - too_long)


def test_group_repetition_padding_and_buckets(tok):
    g, p = 3, 5
    it = build_train_pipeline(_cfg(), tok, g, p, process_index=0, process_count=1)
    b = next(it)
    assert b["input_ids"].shape[0] == g * p and b["input_ids"].dtype == np.int32
    lens = b["attention_mask"].sum(1)
    assert (lens == b["prompt_lengths"]).all()
    length = b["input_ids"].shape[1]
    assert length == min(x for x in (64, 128, 256, 512) if x >= lens.max())
    for i in range(g * p):  # left padding: pads then tokens
        k = lens[i]
        assert (b["input_ids"][i, :length - k] == PAD).all() and b["attention_mask"][i, length - k:].all()
    assert b["group_index"].tolist() == [j for j in range(p) for _ in range(g)]
    for j in range(p):
        rows = slice(j * g, (j + 1) * g)
        assert len(set(b["id"][rows])) == 1 and len(set(b["uid"][rows].tolist())) == 1
        assert (b["input_ids"][rows] == b["input_ids"][j * g]).all()
        assert len({json.dumps(x, sort_keys=True) for x in b["ground_truth"][rows]}) == 1
    assert len(set(b["id"][::g])) == p  # different prompts in different groups


def test_epochs_and_seeded_shuffle(tok, aime24):
    it = build_train_pipeline(_cfg(num_epochs=2, seed=3), tok, 1, 10, process_index=0,
                              process_count=1)
    batches = list(it)
    assert len(batches) == 6
    ids = [i for b in batches for i in b["id"]]
    first, second = ids[:30], ids[30:]
    assert sorted(first) == sorted(second) == sorted(r.id for r in aime24)
    assert first != second  # each epoch reshuffled
    assert first != [r.id for r in aime24]
    assert [u for b in batches for u in b["uid"].tolist()] == list(range(60))
    again = build_train_pipeline(_cfg(num_epochs=2, seed=3), tok, 1, 10, process_index=0,
                                 process_count=1)
    assert next(again)["id"] == batches[0]["id"]
    other = build_train_pipeline(_cfg(num_epochs=2, seed=4), tok, 1, 10, process_index=0,
                                 process_count=1)
    assert next(other)["id"] != batches[0]["id"]
    forever = build_train_pipeline(Config(data=_cfg(num_epochs=None)), tok, 1, 10,
                                   process_index=0, process_count=1)
    assert len([next(forever) for _ in range(9)]) == 9  # past 3 epochs, no StopIteration


def test_two_host_sharding_is_disjoint_and_complete(tok):
    cfg = _cfg(train=("aime24", "amc23"), num_epochs=1, seed=7)
    hosts = [list(build_train_pipeline(cfg, tok, 2, 10, process_index=h, process_count=2))
             for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 7
    ids = [set(i for b in h for i in b["id"]) for h in hosts]
    assert ids[0].isdisjoint(ids[1])
    all_ids = {r.id for n in ("aime24", "amc23") for r in load_dataset(n, DATA_DIR).records}
    assert ids[0] | ids[1] == all_ids and len(all_ids) == 70
    for s in range(7):  # step s of each host = its half of global positions [10s, 10s+10)
        u = set(hosts[0][s]["uid"].tolist()) | set(hosts[1][s]["uid"].tolist())
        assert u == set(range(10 * s, 10 * s + 10))
        assert hosts[0][s]["input_ids"].shape[0] == 10  # 5 local prompts × G=2
    # 21 prompts, 2 per global step (1 per host): 10 whole steps on both hosts, 1 prompt unused
    recs = [Record(id=f"r{i}", prompt=f"p{i}", ground_truth="1", data_source="math_dapo")
            for i in range(21)]
    uneven = [list(build_train_pipeline(cfg, tok, 1, 2, process_index=h, process_count=2,
                                        records=recs)) for h in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 10
    with pytest.raises(ValueError, match="not divisible"):
        build_train_pipeline(cfg, tok, 2, 9, process_index=0, process_count=2)


def test_state_json_roundtrip_and_mismatch(tok):
    cfg = _cfg(train=("aime24", "amc23"))
    a = build_train_pipeline(cfg, tok, 2, 4, process_index=0, process_count=1)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    want = [next(a)["uid"].tolist() for _ in range(20)]
    b = build_train_pipeline(cfg, tok, 2, 4, process_index=0, process_count=1)
    b.set_state(state)
    assert [next(b)["uid"].tolist() for _ in range(20)] == want
    c = build_train_pipeline(_cfg(train=("aime24", "amc23"), seed=1), tok, 2, 4,
                             process_index=0, process_count=1)
    with pytest.raises(DataError, match="different data pipeline"):
        c.set_state(state)


def _digest(batch) -> list:
    return [batch["uid"].tolist(), batch["id"],
            hashlib.sha256(batch["input_ids"].tobytes()).hexdigest(),
            hashlib.sha256(batch["attention_mask"].tobytes()).hexdigest()]


_CHILD = textwrap.dedent("""
    import json, sys, os
    from flowrl_jax.config import DataConfig
    from flowrl_jax.data import build_train_pipeline, load_tokenizer, restore_iterator
    sys.path.insert(0, {tests!r})
    from test_data_pipeline import _digest
    cfg = DataConfig(**json.loads({cfg!r}))
    it = build_train_pipeline(cfg, load_tokenizer(), 2, 4, process_index=0, process_count=1)
    {restore}
    out = [_digest(next(it)) for _ in range({n})]
    state = it.get_state()
    it.close()
    print("RESULT" + json.dumps({{"digests": out, "state": state}}), flush=True)
    os._exit(0)  # skip the slow interpreter teardown of grain worker processes
""")


def _run_child(cfg: DataConfig, restore: str, n: int) -> dict:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()
         if k != "custom"}
    code = _CHILD.format(tests=str(REPO / "tests"), cfg=json.dumps(d), restore=restore, n=n)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_orbax_save_restore_in_new_process(tok, tmp_path):
    cfg = _cfg(train=("aime24", "amc23", "aime25"), seed=11)  # 100 prompts, forever
    it = build_train_pipeline(cfg, tok, 2, 4, process_index=0, process_count=1)
    for _ in range(13):  # mid-epoch: 52 of 100 prompts consumed
        next(it)
    ckpt = tmp_path / "ckpt"
    save_iterator(ckpt, it)
    want = [_digest(next(it)) for _ in range(100)]  # crosses several epoch boundaries
    got = _run_child(cfg, f"restore_iterator({str(ckpt)!r}, it)", 100)
    assert got["digests"] == want
    assert got["state"]["batches"] == 113
    assert json.loads((ckpt / "data_iter" / "process_0-of-1.json").read_text()) == \
        {"next_index": 13}


@pytest.mark.slow  # grain spawns its workers: each re-imports grain + transformers (~10-40 s)
def test_worker_processes_give_the_same_stream(tok):
    cfg = _cfg(train=("aime24", "amc23"), seed=5)
    ref = build_train_pipeline(cfg, tok, 2, 4, process_index=0, process_count=1)
    want = [_digest(next(ref)) for _ in range(8)]
    got = _run_child(DataConfig(**{**cfg.__dict__, "worker_count": 1}), "", 8)
    assert got["digests"] == want
    assert got["state"]["worker_count"] == 1 and got["state"]["batches"] == 8


def test_records_override_and_too_few_prompts(tok):
    recs = [Record(id=f"r{i}", prompt=f"p{i}", ground_truth=str(i), data_source="math_dapo")
            for i in range(3)]
    it = build_train_pipeline(_cfg(shuffle=False), tok, 1, 3, process_index=0, process_count=1,
                              records=recs)
    assert next(it)["id"] == ["r0", "r1", "r2"]
    with pytest.raises(DataError, match="only 3 training prompts"):
        build_train_pipeline(_cfg(), tok, 1, 4, process_index=0, process_count=1, records=recs)


def test_state_portable_to_no_workers_and_refused_otherwise(tok):
    cfg = _cfg(train=("aime24", "amc23"), seed=2)
    a = build_train_pipeline(cfg, tok, 1, 4)  # process index/count from jax (1 process here)
    assert (a.info.process_index, a.info.process_count) == (0, 1)
    for _ in range(3):
        next(a)
    state = a.get_state()
    assert state["batches"] == 3 and state["worker_count"] == 0
    want = [next(a)["uid"].tolist() for _ in range(4)]
    # A state saved by a 2-worker pipeline (its per-worker Grain state is not needed here).
    moved = dict(state, worker_count=2, grain={"opaque": True})
    b = build_train_pipeline(cfg, tok, 1, 4, process_index=0, process_count=1)
    b.set_state(moved)
    assert [next(b)["uid"].tolist() for _ in range(4)] == want
    c = build_train_pipeline(DataConfig(**{**cfg.__dict__, "worker_count": 1}), tok, 1, 4,
                             process_index=0, process_count=1)
    try:
        with pytest.raises(DataError, match="worker_count=0, this pipeline has 1"):
            c.set_state(state)
    finally:
        c.close()


def test_mixed_math_and_code_sets_use_their_own_templates(tok):
    it = build_train_pipeline(_cfg(train=("aime24", "humaneval"), num_epochs=1,
                                   max_prompt_length=2048), tok, 1, 194,
                              process_index=0, process_count=1)
    b = next(it)
    by_source = {}
    for src, text in zip(b["data_source"], b["prompt_text"]):
        by_source.setdefault(src, []).append(text)
    assert len(by_source["aime24"]) == 30 and len(by_source["humaneval"]) == 164
    assert all(SPEC_MATH.split("\n")[0] in t for t in by_source["aime24"])
    assert all("Complete the following Python function" in t and "Answer: $Answer" not in t
               for t in by_source["humaneval"])
