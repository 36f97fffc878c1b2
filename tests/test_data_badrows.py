"""Bad rows: `on_bad_row=error` names the file and line/row; `skip` skips and counts them."""

import json
import logging
import re

import pytest

from flowrl_jax.config import DataConfig, DatasetSpec
from flowrl_jax.data import DataError, load_custom, load_train_records

GOOD = [{"question": f"What is {i} squared?", "answer": str(i * i)} for i in range(6)]


def _spec(path, **kw) -> DatasetSpec:
    return DatasetSpec(name="t", path=str(path), prompt_field="question", answer_field="answer",
                       **kw)


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def bad_jsonl(tmp_path):
    lines = [json.dumps(r) for r in GOOD]
    lines[1] = '{"question": "broken", "answer": '  # line 2: undecodable
    lines[2] = json.dumps({"question": "no answer here"})  # line 3: missing field
    lines[3] = json.dumps({"question": "   ", "answer": "1"})  # line 4: empty prompt
    lines[4] = json.dumps({"question": 17, "answer": "1"})  # line 5: wrong type
    return _write_jsonl(tmp_path / "bad.jsonl", lines)


@pytest.mark.parametrize("line,problem", [
    (2, "undecodable JSON line"), (3, "missing field 'answer'"),
    (4, "field 'question' is empty"), (5, "field 'question' must be a string, got int"),
])
def test_jsonl_error_names_file_and_line(tmp_path, line, problem):
    # One bad line at a time, so the error is about exactly that line.
    lines = [json.dumps(r) for r in GOOD]
    bad = {2: '{"question": "broken", "answer": ',
           3: json.dumps({"question": "no answer here"}),
           4: json.dumps({"question": "   ", "answer": "1"}),
           5: json.dumps({"question": 17, "answer": "1"})}[line]
    lines[line - 1] = bad
    path = _write_jsonl(tmp_path / "one_bad.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: {problem}")):
        load_custom(_spec(path))


def test_jsonl_skip_counts_and_logs(bad_jsonl, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_custom(_spec(bad_jsonl), on_bad_row="skip")
    assert [r.prompt for r in loaded.records] == [GOOD[0]["question"], GOOD[5]["question"]]
    assert loaded.stats.skipped == 4 and loaded.stats.kept == 2 and loaded.stats.read == 6
    assert any(f"{bad_jsonl}:2" in r for r in loaded.stats.reasons)
    assert "skipped 4 bad row(s)" in caplog.text


def test_train_records_report_skips(bad_jsonl):
    data = DataConfig(train=("t",), custom=(_spec(bad_jsonl),), on_bad_row="skip")
    records, stats = load_train_records(data)
    assert len(records) == 2 and stats.skipped == 4
    with pytest.raises(DataError, match=re.escape(f"{bad_jsonl}:2")):
        load_train_records(DataConfig(train=("t",), custom=(_spec(bad_jsonl),)))


def test_json_list_errors_name_element(tmp_path):
    rows = [dict(r) for r in GOOD]
    rows[3] = {"question": "", "answer": "1"}
    rows[4] = {"question": "q", "answer": ["not", "a", "string"]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=re.escape(f"{path}: element 3: field 'question' is empty")):
        load_custom(_spec(path))
    loaded = load_custom(_spec(path), on_bad_row="skip")
    assert loaded.stats.skipped == 2 and len(loaded.records) == 4
    assert "element 4: field 'answer' must be a string or a one-element list" in \
        loaded.stats.reasons[1]


def test_json_undecodable_file_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"question": "a", "answer": "1"},\n{"question": oops}\n]')
    for mode in ("error", "skip"):  # a broken JSON document cannot be skipped row by row
        with pytest.raises(DataError, match=re.escape(f"{path}:3: undecodable JSON")):
            load_custom(_spec(path), on_bad_row=mode)


def test_parquet_errors_name_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    qs = [r["question"] for r in GOOD]
    ans = [r["answer"] for r in GOOD]
    qs[2] = ""  # row 2: empty prompt
    ans[4] = None  # row 4: missing (null) answer → wrong type
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": qs, "answer": ans}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: field 'question' is empty")):
        load_custom(_spec(path))
    loaded = load_custom(_spec(path), on_bad_row="skip")
    assert loaded.stats.skipped == 2 and [r.ground_truth for r in loaded.records] == \
        ["0", "1", "9", "25"]
    assert "row 4: field 'answer' must be a string, got NoneType" in loaded.stats.reasons[1]
    # a column that is missing altogether
    pq.write_table(pa.table({"question": qs}), tmp_path / "noans.parquet")
    with pytest.raises(DataError, match=r"noans\.parquet: row 0: missing field 'answer'"):
        load_custom(_spec(tmp_path / "noans.parquet"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"not found: {tmp_path / 'absent.jsonl'}")):
        load_custom(_spec(tmp_path / "absent.jsonl"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_custom(_spec(tmp_path / "data.txt"))
