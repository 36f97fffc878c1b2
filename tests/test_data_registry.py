"""Every shipped data set loads through the registry (from the copy inside the package) with its
row count and correct gold answers; user data sets from files and `datasets` folders."""

import gzip
import json
from pathlib import Path

import pytest

from flowrl_jax.config import DatasetSpec, load_config
from flowrl_jax.data import (ENV_DATA_DIR, REGISTRY, DataError, last_boxed, load_custom,
                             load_dataset, load_eval_set, resolve_data_dir)
from flowrl_jax.data.registry import PACKAGED_DATA_DIR

EXPECTED_COUNTS = {
    "dapo_math_17k": 17917, "math_train": 7474, "aime24": 30, "aime25": 30, "amc23": 40,
    "math500": 500, "minerva_math": 272, "olympiadbench": 675, "gsm8k": 1319,
    "humaneval": 164, "humanevalplus": 164, "humanevalplus_rllm": 163, "livecodebench": 279,
    "codeforces": 408, "codeforces_heldout": 201, "code_train": 207,
}
ROWS_IN_FILE = {"humanevalplus_rllm": 164, "codeforces_heldout": 408}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    assert PACKAGED_DATA_DIR.is_dir(), f"packaged data folder missing: {PACKAGED_DATA_DIR}"
    return PACKAGED_DATA_DIR


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {name: load_dataset(name, data_dir) for name in EXPECTED_COUNTS}


def test_registry_covers_every_shipped_set():
    assert set(REGISTRY) == set(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_row_counts_and_record_shape(loaded, name):
    ls = loaded[name]
    # rows in the file; MATH-train has 4 rows without an answer, dropped as a known fault
    assert ls.stats.read == ROWS_IN_FILE.get(name, EXPECTED_COUNTS[name]) == REGISTRY[name].num_rows
    dropped = 4 if name == "math_train" else 0
    assert ls.stats.dropped == dropped and ls.stats.skipped == 0
    assert len(ls.records) == EXPECTED_COUNTS[name] - dropped
    info = REGISTRY[name]
    ids = [r.id for r in ls.records]
    if name != "dapo_math_17k":  # DAPO ids are its `extra_info.index`, unique too
        assert len(set(ids)) == len(ids), "ids must be unique"
    for r in ls.records:
        assert isinstance(r.prompt, str) and r.prompt.strip()
        assert r.data_source == info.data_source
        assert r.template == info.template
        if info.template == "math":
            assert isinstance(r.ground_truth, str) and r.ground_truth.strip()
        else:
            assert isinstance(r.ground_truth, dict)


def _by_id(loaded, name, rid):
    matches = [r for r in loaded[name].records if r.id == rid]
    assert len(matches) == 1, f"{rid} not found once in {name}"
    return matches[0]


def test_gold_answer_spot_checks(loaded):
    # Values read by hand from the shipped files.
    dapo = loaded["dapo_math_17k"].records[0]
    assert dapo.ground_truth == "34" and dapo.data_source == "math_dapo"
    assert dapo.prompt.startswith("In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$")
    assert loaded["math_train"].records[0].ground_truth == "0"
    mt = loaded["math_train"].records  # rows 886 and 1009 have answer null: dropped
    assert [r.id for r in mt[885:887]] == ["math_train/885", "math_train/887"]
    assert mt[886].prompt.startswith("The sum of three different numbers is 67.")
    assert _by_id(loaded, "aime24", "aime24/60").ground_truth == "204"
    assert _by_id(loaded, "aime25", "aime25/2025-I-1").ground_truth == "70"
    # amc23 answers are floats in the file: 27.0 → "27", -1.0 → "-1"
    amc = [r.ground_truth for r in loaded["amc23"].records]
    assert amc[:4] == ["27", "36", "45", "3159"] and "-1" in amc
    assert _by_id(loaded, "math500", "math500/test/precalculus/807.json").ground_truth == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    # minerva: the last \boxed{} of the solution, nested braces matched
    assert _by_id(loaded, "minerva_math", "minerva_math/0").ground_truth == "1.6"
    assert _by_id(loaded, "minerva_math", "minerva_math/12").ground_truth == (
        "\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[e^{h c /(\\lambda k T)}-1\\right] d^{2}}")
    # olympiadbench: final_answer[0].strip("$")
    assert _by_id(loaded, "olympiadbench", "olympiadbench/1606").ground_truth == "2"
    assert _by_id(loaded, "olympiadbench", "olympiadbench/2334").ground_truth == "\\frac{41}{12}"
    assert _by_id(loaded, "olympiadbench", "olympiadbench/2334").extra["unit"] == "km"
    # gsm8k: after ####, thousands separators removed
    assert _by_id(loaded, "gsm8k", "gsm8k/0").ground_truth == "18"
    assert _by_id(loaded, "gsm8k", "gsm8k/2").ground_truth == "70000"


def test_code_ground_truth(loaded):
    lcb = loaded["livecodebench"].records
    first = lcb[0].ground_truth
    assert first["tests"][0] == {"input": "4\n8 2 5 1\n", "output": "3\n", "testtype": "stdin"}
    assert first["starter_code"] == ""
    assert sum(1 for r in lcb if r.ground_truth["starter_code"]) == 104
    assert sum(len(r.ground_truth["tests"]) for r in lcb) == 474 + 262
    cf = loaded["codeforces"].records[0].ground_truth
    assert cf["tests"][0]["input"].startswith("10\n1 9\n8 4") and "starter_code" not in cf
    he = _by_id(loaded, "humaneval", "HumanEval/0")
    assert he.ground_truth["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in he.ground_truth["test"]
    assert he.ground_truth["prompt"] == he.prompt
    assert "import numpy" in _by_id(loaded, "humanevalplus", "HumanEval/0").ground_truth["test"]
    hep = _by_id(loaded, "humanevalplus", "HumanEval/32")
    # Why rllm/FlowRL drop HumanEval/32: its OriginFmt check unpacks the returned float
    # (`_poly(*candidate(*inp), inp)`), so even the canonical solution fails.
    assert hep.data_source == "humanevalplus"
    assert "_poly(*candidate(*inp), inp)" in hep.ground_truth["test"]
    assert "HumanEval/32" not in {r.id for r in loaded["humanevalplus_rllm"].records}


def test_last_boxed_handles_nesting_and_absence():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("\\boxed{a{b}c} and \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed("spaced \\boxed {x^2}") == "x^2"
    assert last_boxed("braceless \\boxed 5$ end") == "5"


def test_load_eval_set_limit(data_dir):
    recs = load_eval_set("math500", data_dir, limit=7)
    assert [r.id for r in recs] == [r.id for r in load_dataset("math500", data_dir).records[:7]]
    assert len(load_eval_set("humanevalplus_rllm", data_dir, limit=40)) == 40


def test_data_root_order_config_then_env_then_packaged(data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    assert resolve_data_dir(None) == PACKAGED_DATA_DIR
    assert len(load_dataset("dapo_math_17k", limit=3).records) == 3  # no data option at all
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "nope"))
    with pytest.raises(DataError, match=rf"nope is not a directory \(from \${ENV_DATA_DIR}"):
        resolve_data_dir(None)
    assert resolve_data_dir(data_dir) == data_dir  # data.data_dir wins over the environment
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    with pytest.raises(DataError, match=r"not found: .*aime24/test\.jsonl"):
        load_dataset("aime24")
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        load_dataset("nope", data_dir)


def test_code_train_is_held_out_from_evaluation(loaded):
    train = loaded["code_train"].records
    assert all(r.data_source == "codeforces" and r.template == "code" for r in train)
    heldout = {r.prompt for r in loaded["codeforces_heldout"].records}
    lcb = {r.prompt for r in loaded["livecodebench"].records}
    assert not ({r.prompt for r in train} & (heldout | lcb))
    # together the two halves are exactly the codeforces set
    assert {r.prompt for r in train} | heldout == {r.prompt for r in loaded["codeforces"].records}
    assert {r.id for r in loaded["codeforces_heldout"].records} <= \
        {r.id for r in loaded["codeforces"].records}


def test_code_train_file_is_what_the_build_script_makes(data_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_code_train", Path(__file__).resolve().parents[1] / "scripts" / "build_code_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render(mod.build_rows(data_dir)) == (data_dir / mod.OUT_REL).read_bytes()


def test_code_config_trains_on_code_train_with_the_code_reward():
    from flowrl_jax import rewards
    from flowrl_jax.data.pipeline import load_train_records

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" /
                      "r1-distill-qwen-7b-code.yaml")
    assert cfg.data.train == ("code_train",) and cfg.data.custom == ()
    recs, _ = load_train_records(cfg.data)
    assert len(recs) == 207
    rec = recs[0]  # 1971A: print min and max of each pair
    good = ("```python\nt = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())"
            "\n    print(min(x, y), max(x, y))\n```")
    assert rewards.score(rec.data_source, good, rec.ground_truth) == 1.0
    assert rewards.score(rec.data_source, "```python\nprint(0)\n```", rec.ground_truth) == 0.0


def test_custom_dataset_from_yaml(tmp_path):
    rows = [{"q": {"text": f"What is {i}+{i}?"}, "sol": f"so \\boxed{{{2 * i}}}", "key": f"k{i}"}
            for i in range(5)]
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    yml = tmp_path / "cfg.yaml"
    yml.write_text(
        "data:\n  train: [mine]\n  custom:\n"
        f"    - {{name: mine, path: {path}, prompt_field: q.text, answer_field: sol, "
        "id_field: key, answer_extract: last_boxed, data_source: math_verify}\n")
    cfg = load_config(yml)
    spec = cfg.data.custom[0]
    assert isinstance(spec, DatasetSpec)
    recs = load_custom(spec).records
    assert [r.ground_truth for r in recs] == ["0", "2", "4", "6", "8"]
    assert recs[3].prompt == "What is 3+3?" and recs[3].id == "mine/k3"
    assert recs[0].data_source == "math_verify"
    assert [r.id for r in load_eval_set("mine", custom=cfg.data.custom, limit=2)] == \
        ["mine/k0", "mine/k1"]


def test_custom_code_dataset_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tests = [[{"input": "1\n", "output": "2\n"}], [{"input": "3\n", "output": "4\n"}]]
    pq.write_table(pa.table({"problem": ["inc", "inc2"], "tests": tests,
                             "stub": ["", "class Solution: ..."]}), tmp_path / "c.parquet")
    spec = DatasetSpec(name="c", path=str(tmp_path / "c.parquet"), prompt_field="problem",
                       answer_field="tests", data_source="livecodebench", template="code",
                       starter_code_field="stub")
    recs = load_custom(spec).records
    assert recs[0].ground_truth == {"tests": [{"input": "1\n", "output": "2\n",
                                               "testtype": "stdin"}], "starter_code": ""}
    assert recs[1].ground_truth["starter_code"] == "class Solution: ..."


def save_like_datasets(folder: Path, table, num_shards: int = 1) -> Path:
    """Write `table` as `datasets`' `Dataset.save_to_disk` does: Arrow IPC stream shards named
    data-0000K-of-0000N.arrow, listed in state.json, with a dataset_info.json beside them."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    per = -(-table.num_rows // num_shards)
    names = []
    for k in range(num_shards):
        name = f"data-{k:05d}-of-{num_shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table.slice(k * per, per))
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({
        "_data_files": names, "_fingerprint": "0123456789abcdef", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "",
                                                          "features": {}, "homepage": ""}))
    return folder


def test_custom_dataset_saved_by_datasets(tmp_path):
    import pyarrow as pa

    table = pa.table({"question": [f"What is {i}*2?" for i in range(7)],
                      "meta": [{"gold": str(2 * i)} for i in range(7)]})
    folder = save_like_datasets(tmp_path / "saved", table, num_shards=3)
    yml = tmp_path / "cfg.yaml"
    yml.write_text("data:\n  train: [mine]\n  custom:\n"
                   f"    - {{name: mine, path: '{folder}', prompt_field: question, "
                   "answer_field: meta.gold, data_source: math_verify}\n")
    spec = load_config(yml).data.custom[0]
    recs = load_custom(spec).records
    assert [r.ground_truth for r in recs] == [str(2 * i) for i in range(7)]  # shard order kept
    assert recs[6].prompt == "What is 6*2?" and recs[6].data_source == "math_verify"


def test_datasets_dict_folder_asks_for_a_split(tmp_path):
    import pyarrow as pa

    root = tmp_path / "dd"
    save_like_datasets(root / "train", pa.table({"q": ["a"], "answer": ["1"]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    spec = DatasetSpec(name="dd", path=str(root), prompt_field="q")
    with pytest.raises(DataError, match=r"DatasetDict with splits train; .*dd/train"):
        load_custom(spec)
    assert len(load_custom(DatasetSpec(name="dd", path=str(root / "train"),
                                       prompt_field="q")).records) == 1
    with pytest.raises(DataError, match=r"not one saved by `datasets`"):
        load_custom(DatasetSpec(name="x", path=str(tmp_path)))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf_dataset"])
def test_malformed_row_names_file_row_and_field(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": "fine", "answer": "1"}, {"q": "also fine", "answer": "2"},
            {"q": "no gold", "answer": ""}]
    if kind == "jsonl":
        path = tmp_path / "u.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        where = r"u\.jsonl:3"  # line number
    elif kind == "parquet":
        path = tmp_path / "u.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        where = r"u\.parquet: row 2"
    else:
        path = save_like_datasets(tmp_path / "u", pa.Table.from_pylist(rows))
        where = r"u: row 2 \(shard data-00000-of-00001\.arrow\)"
    spec = DatasetSpec(name="u", path=str(path), prompt_field="q")
    with pytest.raises(DataError, match=where + r".*'answer'"):
        load_custom(spec)
    assert len(load_custom(spec, on_bad_row="skip").records) == 2


def test_format_and_path_kind_must_agree(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"prompt": "p", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"format jsonl needs a file"):
        load_custom(DatasetSpec(name="d", path=str(tmp_path), format="jsonl"))
    with pytest.raises(DataError, match=r"format hf_dataset needs a folder saved by `datasets`"):
        load_custom(DatasetSpec(name="f", path=str(tmp_path / "f.jsonl"), format="hf_dataset"))
