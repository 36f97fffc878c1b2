"""Registry of the named data sets (training, math eval, code eval) and user data sets from YAML.

Each entry knows its file under the data root, its format, its reward `data_source`, its
default prompt template and how to turn one row into a `Record` (gold answers extracted as
assets/data/GRADING.md describes). The data root is `data.data_dir`, else `$FLOWRL_DATA_DIR`,
else the copy shipped inside the package (flowrl_jax/assets/data, provenance in its README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from flowrl_jax.config import DatasetSpec
from flowrl_jax.data.extract import (gsm8k_answer, last_boxed, number_to_str, olympiad_answer,
                                     parse_tests)
from flowrl_jax.data.records import (BadRow, DataError, DropRow, LoadStats, Record, get_field,
                                     read_records, require_str)

ENV_DATA_DIR = "FLOWRL_DATA_DIR"
# The shipped copy of every registered set (package data, so installed wheels carry it too).
PACKAGED_DATA_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"

# rllm/FlowRL drop this HumanEval+ task: its OriginFmt check calls `_poly(*candidate(*inp), inp)`,
# unpacking the returned float, so every answer (the canonical solution too) raises TypeError.
HUMANEVALPLUS_RLLM_DROPPED = ("HumanEval/32",)

# The code training set (built by scripts/build_code_train.py) is the older half of the shipped
# Codeforces contests: contests 1971-1999, which are the first 207 rows of codeforces.json
# (sorted by contest). Contests 2000-2036 stay held out as `codeforces_heldout`; LiveCodeBench
# and HumanEval(+) are not used for training at all. Provenance README: "Code training set".
CODE_TRAIN_FIRST_HELDOUT_CONTEST = 2000
CODE_TRAIN_CODEFORCES_ROWS = 207


@dataclass(frozen=True)
class DatasetInfo:
    """A shipped data set: where it lives and how its rows become Records."""

    name: str
    path: str  # relative to the data root
    format: str
    data_source: str
    template: str
    parse: Callable[[dict, int], Record]
    num_rows: int  # rows in the shipped file (checked by the tests; see LoadStats.read)
    kind: str  # train | math_eval | code_eval
    drop_ids: tuple[str, ...] = ()
    note: str = ""


# --------------------------------------------------------------------------- row parsers


def _math(name: str, data_source: str, prompt_key: str, answer: Callable[[dict], Any],
          id_key: Optional[str] = None, extra_keys: tuple[str, ...] = (),
          drop_unanswered: bool = False) -> Callable[[dict, int], Record]:
    """A parser for a math set: prompt from `prompt_key`, gold from `answer(row)`."""

    def parse(row: dict, index: int) -> Record:
        prompt = require_str(get_field(row, prompt_key), prompt_key)
        if drop_unanswered and str(row.get("answer") or "").strip() == "":
            raise DropRow("no gold answer in the shipped file")
        gt = answer(row)
        if gt is None:
            raise BadRow("no gold answer could be extracted")
        if not isinstance(gt, str):
            raise BadRow(f"gold answer must be a string, got {type(gt).__name__}")
        if not gt.strip():
            raise BadRow("gold answer is empty")
        rid = str(get_field(row, id_key)) if id_key else str(index)
        extra = {k: row[k] for k in extra_keys if k in row}
        return Record(id=f"{name}/{rid}", prompt=prompt, ground_truth=gt.strip(),
                      data_source=data_source, template="math", extra=extra)

    return parse


def _str_field(key: str) -> Callable[[dict], Any]:
    def get(row: dict) -> Any:
        v = get_field(row, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return number_to_str(v)
        return require_str(v, key)
    return get


def _amc_answer(row: dict) -> str:
    v = get_field(row, "answer")
    try:
        return number_to_str(v)
    except TypeError as e:
        raise BadRow(f"field 'answer': {e}") from None


def _minerva_answer(row: dict) -> Optional[str]:
    return last_boxed(require_str(get_field(row, "solution"), "solution"))


def _gsm8k(row: dict) -> Optional[str]:
    return gsm8k_answer(require_str(get_field(row, "answer"), "answer"))


def _olympiad(row: dict) -> Optional[str]:
    return olympiad_answer(get_field(row, "final_answer"))


def _dapo_prompt(row: dict) -> str:
    msgs = get_field(row, "prompt")
    if isinstance(msgs, str):
        return require_str(msgs, "prompt")
    if not isinstance(msgs, list) or not msgs:
        raise BadRow(f"field 'prompt' must be a non-empty list of messages, got {msgs!r:.80}")
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRow("field 'prompt' has no user message")
    return require_str(users[-1].get("content"), "prompt.content")


def _parse_dapo(row: dict, index: int) -> Record:
    prompt = _dapo_prompt(row)
    gt = get_field(row, "reward_model.ground_truth")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = number_to_str(gt)
    gt = require_str(gt, "reward_model.ground_truth")
    idx = row.get("extra_info", {}).get("index", index) if isinstance(row.get("extra_info"), dict) \
        else index
    return Record(id=f"dapo_math_17k/{idx}", prompt=prompt, ground_truth=gt.strip(),
                  data_source="math_dapo", template="math", extra={})


def _tests(value: Any, key: str) -> list[dict]:
    try:
        tests = parse_tests(value)
    except (TypeError, ValueError, SyntaxError) as e:
        raise BadRow(f"field {key!r}: {e}") from None
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise BadRow(f"field {key!r}[{i}]: a test needs 'input' and 'output'")
        t = dict(t)
        t.setdefault("testtype", "stdin")
        out.append(t)
    if not out:
        raise BadRow(f"field {key!r} has no tests")
    return out


def _code_tests_parser(name: str, data_source: str, with_starter: bool
                       ) -> Callable[[dict, int], Record]:
    def parse(row: dict, index: int) -> Record:
        prompt = require_str(get_field(row, "problem"), "problem")
        gt: dict[str, Any] = {"tests": _tests(get_field(row, "tests"), "tests")}
        if with_starter:
            starter = row.get("starter_code") or ""
            gt["starter_code"] = require_str(starter, "starter_code", allow_empty=True)
        return Record(id=f"{name}/{index}", prompt=prompt, ground_truth=gt,
                      data_source=data_source, template="code", extra={})
    return parse


def _parse_code_train(row: dict, index: int) -> Record:
    prompt = require_str(get_field(row, "problem"), "problem")
    rid = require_str(get_field(row, "id"), "id")
    return Record(id=f"code_train/{rid}", prompt=prompt,
                  ground_truth={"tests": _tests(get_field(row, "tests"), "tests")},
                  data_source="codeforces", template="code", extra={})


def _humaneval_parser(data_source: str) -> Callable[[dict, int], Record]:
    def parse(row: dict, index: int) -> Record:
        prompt = require_str(get_field(row, "prompt"), "prompt")
        gt = {"test": require_str(get_field(row, "test"), "test"),
              "entry_point": require_str(get_field(row, "entry_point"), "entry_point"),
              "prompt": prompt}
        tid = require_str(get_field(row, "task_id"), "task_id")
        return Record(id=tid, prompt=prompt, ground_truth=gt, data_source=data_source,
                      template="code", extra={})
    return parse


# --------------------------------------------------------------------------- the registry


def _entries() -> dict[str, DatasetInfo]:
    m = "math_eval"
    e = [
        DatasetInfo("dapo_math_17k", "dapo_math_17k/dapo_math_17k.parquet", "parquet",
                    "math_dapo", "math", _parse_dapo, 17917, "train"),
        DatasetInfo("math_train", "math_train/math.json", "json", "math_dapo", "math",
                    _math("math_train", "math_dapo", "problem", _str_field("answer"),
                          extra_keys=("type", "difficulty"), drop_unanswered=True), 7474,
                    "train", note="4 rows have no answer (null or empty) and are dropped"),
        DatasetInfo("aime24", "aime24/test.jsonl", "jsonl", "aime24", "math",
                    _math("aime24", "aime24", "problem", _str_field("answer"), "id"), 30, m),
        DatasetInfo("aime25", "aime25/test.jsonl", "jsonl", "aime25", "math",
                    _math("aime25", "aime25", "problem", _str_field("answer"), "id",
                          ("has_tikz",)), 30, m),
        DatasetInfo("amc23", "amc23/test.jsonl", "jsonl", "amc23", "math",
                    _math("amc23", "amc23", "problem", _amc_answer, "id"), 40, m),
        DatasetInfo("math500", "math500/test.jsonl", "jsonl", "math500", "math",
                    _math("math500", "math500", "problem", _str_field("answer"), "unique_id",
                          ("subject", "level")), 500, m),
        DatasetInfo("minerva_math", "minerva_math/test.jsonl", "jsonl", "minerva_math", "math",
                    _math("minerva_math", "minerva_math", "problem", _minerva_answer, "idx",
                          ("type",)), 272, m),
        DatasetInfo("olympiadbench", "olympiadbench/test.jsonl", "jsonl", "olympiadbench",
                    "math", _math("olympiadbench", "olympiadbench", "question", _olympiad, "id",
                                  ("is_multiple_answer", "unit", "answer_type", "subfield")),
                    675, m),
        DatasetInfo("gsm8k", "gsm8k/test.jsonl", "jsonl", "gsm8k", "math",
                    _math("gsm8k", "gsm8k", "question", _gsm8k, "idx"), 1319, m),
        DatasetInfo("humaneval", "humaneval/HumanEval.jsonl.gz", "jsonl", "humaneval", "code",
                    _humaneval_parser("humaneval"), 164, "code_eval"),
        DatasetInfo("humanevalplus", "humanevalplus/HumanEvalPlus-OriginFmt.jsonl.gz", "jsonl",
                    "humanevalplus", "code", _humaneval_parser("humanevalplus"), 164,
                    "code_eval", note="all 164 tasks, as the EvalPlus leaderboard"),
        DatasetInfo("humanevalplus_rllm", "humanevalplus/HumanEvalPlus-OriginFmt.jsonl.gz",
                    "jsonl", "humanevalplus", "code", _humaneval_parser("humanevalplus"), 164,
                    "code_eval", drop_ids=HUMANEVALPLUS_RLLM_DROPPED,
                    note="163 tasks: rllm/FlowRL drop HumanEval/32"),
        DatasetInfo("livecodebench", "livecodebench/livecodebench.json", "json",
                    "livecodebench", "code",
                    _code_tests_parser("livecodebench", "livecodebench", True), 279,
                    "code_eval"),
        DatasetInfo("codeforces", "codeforces/codeforces.json", "json", "codeforces", "code",
                    _code_tests_parser("codeforces", "codeforces", False), 408, "code_eval"),
        DatasetInfo("codeforces_heldout", "codeforces/codeforces.json", "json", "codeforces",
                    "code", _code_tests_parser("codeforces", "codeforces", False), 408,
                    "code_eval", drop_ids=tuple(f"codeforces/{i}"
                                                for i in range(CODE_TRAIN_CODEFORCES_ROWS)),
                    note="201 problems of contests 2000-2036: Codeforces without code_train"),
        DatasetInfo("code_train", "code_train/code_train.jsonl", "jsonl", "codeforces", "code",
                    _parse_code_train, CODE_TRAIN_CODEFORCES_ROWS, "train",
                    note="Codeforces contests 1971-1999 (scripts/build_code_train.py)"),
    ]
    return {d.name: d for d in e}


REGISTRY: dict[str, DatasetInfo] = _entries()


def list_datasets(kind: Optional[str] = None) -> list[str]:
    """Names of the registered data sets (optionally only `train`, `math_eval` or `code_eval`)."""
    return [n for n, d in REGISTRY.items() if kind is None or d.kind == kind]


def resolve_data_dir(data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The data root: `data_dir`, else `$FLOWRL_DATA_DIR`, else the packaged copy."""
    if data_dir:
        root, origin = Path(data_dir), "data.data_dir"
    elif os.environ.get(ENV_DATA_DIR):
        root, origin = Path(os.environ[ENV_DATA_DIR]), "$" + ENV_DATA_DIR
    else:
        root, origin = PACKAGED_DATA_DIR, "the packaged copy"
    p = root.expanduser()
    if not p.is_dir():
        hint = (f"unset ${ENV_DATA_DIR} / data.data_dir to use the packaged copy"
                if origin != "the packaged copy" else "reinstall flowrl-jax")
        raise DataError(f"data root {p} is not a directory (from {origin}; {hint})")
    return p


@dataclass
class LoadedSet:
    """Records of one data set plus how many rows were read/skipped."""

    name: str
    records: list[Record]
    stats: LoadStats = field(default_factory=LoadStats)


def load_dataset(name: str, data_dir: Optional[Union[str, Path]] = None,
                 on_bad_row: str = "error", limit: Optional[int] = None) -> LoadedSet:
    """Load a registered data set by name into Records."""
    if name not in REGISTRY:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(REGISTRY)}); "
                        f"add your own under data.custom")
    info = REGISTRY[name]
    path = resolve_data_dir(data_dir) / info.path
    read_limit = None if info.drop_ids else limit
    recs, stats = read_records(path, info.parse, info.format, on_bad_row, read_limit)
    if info.drop_ids:
        recs = [r for r in recs if r.id not in info.drop_ids]
        recs = recs[:limit] if limit is not None else recs
        stats.kept = len(recs)
    return LoadedSet(name, recs, stats)


def _spec_path(spec: DatasetSpec, data_dir: Optional[Union[str, Path]]) -> Path:
    p = Path(spec.path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    root = data_dir or os.environ.get(ENV_DATA_DIR)
    return Path(root) / p if root else p


def _custom_answer(value: Any, spec: DatasetSpec, key: str) -> Union[str, dict]:
    extract = getattr(spec, "answer_extract", "none")
    if spec.template == "code":
        if isinstance(value, dict):
            return value
        return {"tests": _tests(value, key)}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = number_to_str(value)
    if isinstance(value, list):
        # OlympiadBench-style one-element list; anything longer is ambiguous
        if len(value) != 1 or not isinstance(value[0], str):
            raise BadRow(f"field {key!r} must be a string or a one-element list of strings, "
                         f"got a list of {len(value)}")
        value = olympiad_answer(value)
    value = require_str(value, key)
    if extract == "last_boxed":
        value = last_boxed(value)
    elif extract == "after_hashes":
        value = gsm8k_answer(value)
    if value is None or not value.strip():
        raise BadRow(f"no gold answer could be extracted from field {key!r}")
    return value.strip()


def custom_parser(spec: DatasetSpec) -> Callable[[dict, int], Record]:
    """A row parser built from a YAML `DatasetSpec` field mapping."""
    name = spec.name or Path(spec.path).stem
    starter_field = getattr(spec, "starter_code_field", None)

    def parse(row: dict, index: int) -> Record:
        prompt = get_field(row, spec.prompt_field)
        if isinstance(prompt, list):  # chat-style [{role, content}] prompts
            prompt = _dapo_prompt({"prompt": prompt})
        prompt = require_str(prompt, spec.prompt_field)
        gt = _custom_answer(get_field(row, spec.answer_field), spec, spec.answer_field)
        if starter_field and isinstance(gt, dict):
            gt = dict(gt, starter_code=require_str(row.get(starter_field) or "", starter_field,
                                                   allow_empty=True))
        rid = str(get_field(row, spec.id_field)) if spec.id_field else str(index)
        return Record(id=f"{name}/{rid}", prompt=prompt, ground_truth=gt,
                      data_source=spec.data_source, template=spec.template, extra={})

    return parse


def load_custom(spec: DatasetSpec, data_dir: Optional[Union[str, Path]] = None,
                on_bad_row: str = "error", limit: Optional[int] = None) -> LoadedSet:
    """Load a user data set described by a `DatasetSpec` (path + field mapping)."""
    if not spec.path:
        raise DataError(f"data.custom entry {spec.name or '?'!r}: `path` is required")
    path = _spec_path(spec, data_dir)
    recs, stats = read_records(path, custom_parser(spec), spec.format, on_bad_row, limit)
    return LoadedSet(spec.name or path.stem, recs, stats)


def load_eval_set(name: str, data_dir: Optional[Union[str, Path]] = None,
                  limit: Optional[int] = None, custom: tuple[DatasetSpec, ...] = (),
                  on_bad_row: str = "error") -> list[Record]:
    """Records of an evaluation set by name (registry or a `data.custom` entry), first `limit`."""
    for spec in custom:
        if spec.name == name:
            return load_custom(spec, data_dir, on_bad_row, limit).records
    return load_dataset(name, data_dir, on_bad_row, limit).records
