"""Code rewards (SPEC §3): extract the last fenced block, run it sandboxed against the tests, 1/0.

Benchmarks and their conventions:
- LiveCodeBench: `stdin` tests compare stdout line by line after stripping (whole-line equality,
  else token-wise Decimal equality, as lcb_runner's `grade_stdio`); `functional` tests call
  `Solution().<method>(*args)` with one JSON value per input line and compare the JSON result.
  6 s per test; LCB's import preamble is prepended to the program.
- Codeforces: stdin/stdout like LCB stdin, 12 s per test, at most 15 tests.
- HumanEval / HumanEval+: program (prompt prepended when it does not define the entry point)
  + test code + `check(entry_point)`. Each candidate call gets 1 s (interval timer inside
  the sandbox); the whole check() program gets `2 s + 0.25 s x number of test inputs`,
  clamped to [5 s, 30 s] (startup + numpy import, then a generous per-case share).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from flowrl_jax.rewards.sandbox import RunResult, SandboxConfig, run_python

# CPython 3.11's ast.parse is not thread-safe ("SystemError: AST constructor recursion depth
# mismatch" when two RewardPool threads parse at once), so parses are serialised.
_AST_LOCK = threading.Lock()


def _parse(code: str) -> ast.AST:
    with _AST_LOCK:
        return ast.parse(code)

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)```", re.DOTALL)

# Like lcb_runner: common imports available to the program, deeper recursion allowed.
LCB_PREAMBLE = (
    "import sys, os, re, math, json, string, random, heapq, bisect, itertools, functools, "
    "collections, operator, copy, statistics, datetime, io\n"
    "from typing import *\nfrom collections import *\nfrom itertools import *\n"
    "from functools import *\nfrom heapq import *\nfrom bisect import *\nfrom math import *\n"
    "from string import *\nfrom operator import *\nfrom copy import *\n"
    "sys.setrecursionlimit(50000)\n"
)


@dataclass(frozen=True)
class CodeLimits:
    """Per-benchmark time limits (seconds) and test caps."""

    livecodebench_s: float = 6.0
    codeforces_s: float = 12.0
    codeforces_max_tests: int = 15
    humaneval_case_s: float = 1.0
    humaneval_base_s: float = 2.0
    humaneval_per_input_s: float = 0.25
    humaneval_min_s: float = 5.0
    humaneval_max_s: float = 30.0


def extract_code(response: str) -> str | None:
    """The last fenced code block (language tag optional), or None if there is none."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return None
    code = blocks[-1][1]
    return code if code.strip() else None


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except (InvalidOperation, ValueError):
        return None


def outputs_match(actual: str, expected: str) -> bool:
    """LiveCodeBench stdout comparison: same number of stripped lines, each equal as text or
    as a list of Decimal tokens (so `1.0` == `1`, `2  3` == `2 3`)."""
    got, want = _stripped_lines(actual.replace("\r\n", "\n")), _stripped_lines(expected.replace("\r\n", "\n"))
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        if g.split() == w.split():
            continue
        dg, dw = _decimals(g), _decimals(w)
        if dg is None or dw is None or dg != dw:
            return False
    return True


def method_name(starter_code: str) -> str | None:
    """First method name defined in a LeetCode-style `class Solution` starter stub."""
    m = re.search(r"def\s+([A-Za-z_]\w*)\s*\(\s*self", starter_code or "")
    return m.group(1) if m else None


# Harness programs carry a random result marker; deleting the script file first keeps a
# program from reading the marker back and faking a pass (e.g. print it, then exit early).
_HIDE_SOURCE = (
    "import os as _flowrl_os\ntry:\n    _flowrl_os.unlink(__file__)\nexcept OSError:\n"
    "    pass\ndel _flowrl_os\n"
)


def _new_marker() -> str:
    return "@@FLOWRL_" + secrets.token_hex(12) + "@@"


def _functional_program(code: str, method: str, test_input: str, marker: str) -> str:
    # The result goes after a random marker so stray prints by the program cannot fake it.
    harness = f"""

def __flowrl_main():
    import json as _j, sys as _s
    _args = [_j.loads(_l) for _l in {test_input!r}.split("\\n") if _l.strip()]
    _res = Solution().{method}(*_args)
    if isinstance(_res, tuple):
        _res = list(_res)
    # numpy scalars/arrays compare equal to Python values in LCB; make them serialisable
    _enc = lambda _o: _o.tolist() if hasattr(_o, "tolist") else repr(_o)
    _s.stdout.write("\\n{marker}" + _j.dumps(_res, default=_enc) + "\\n")
    _s.stdout.flush()

__flowrl_main()
"""
    return _HIDE_SOURCE + LCB_PREAMBLE + "\n" + code + "\n" + harness


def _functional_passes(result: RunResult, expected: str, marker: str) -> bool:
    if not result.ok or marker not in result.stdout:
        return False
    got_text = result.stdout.rsplit(marker, 1)[1].strip()
    try:
        got, want = json.loads(got_text), json.loads(expected)
    except json.JSONDecodeError:
        return False
    return got == want


def run_io_tests(code: str, tests: list[Mapping[str, Any]], timeout_s: float, *,
                 starter_code: str = "", preamble: str = "",
                 sandbox: SandboxConfig | None = None) -> bool:
    """True iff the program passes every stdin/stdout or functional test (stops at the first failure)."""
    if not tests:
        raise ValueError("code reward: ground_truth['tests'] is empty")
    for i, test in enumerate(tests):
        if "input" not in test or "output" not in test:
            raise ValueError(f"code reward: test {i} lacks 'input'/'output' keys: {sorted(test)}")
        kind = test.get("testtype", "stdin")
        if kind == "functional":
            method = method_name(starter_code)
            if method is None:
                raise ValueError("code reward: functional test but no method name in starter_code "
                                 f"{starter_code[:80]!r}")
            marker = _new_marker()
            program = _functional_program(code, method, str(test["input"]), marker)
            res = run_python(program, "", timeout_s, sandbox)
            if not _functional_passes(res, str(test["output"]), marker):
                return False
        elif kind == "stdin":
            res = run_python(preamble + code, str(test["input"]), timeout_s, sandbox)
            if not res.ok or not outputs_match(res.stdout, str(test["output"])):
                return False
        else:
            raise ValueError(f"code reward: test {i} has unknown testtype {kind!r}")
    return True


def _count_inputs(test_code: str) -> int:
    """Number of test inputs in a HumanEval(+) check: `inputs = [...]` length, else assert count."""
    try:
        tree = _parse(test_code)
    except SyntaxError:
        return test_code.count("assert")
    n = 0
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                and any(isinstance(t, ast.Name) and t.id == "inputs" for t in node.targets)):
            n += len(node.value.elts)
    return n or max(1, test_code.count("assert"))


def humaneval_budget_s(test_code: str, limits: CodeLimits = CodeLimits()) -> float:
    """Wall budget of one check() program (see module docstring)."""
    raw = limits.humaneval_base_s + limits.humaneval_per_input_s * _count_inputs(test_code)
    return min(limits.humaneval_max_s, max(limits.humaneval_min_s, raw))


def _defines(code: str, name: str) -> bool:
    try:
        tree = _parse(code)
    except SyntaxError:
        return re.search(rf"def\s+{re.escape(name)}\s*\(", code) is not None
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
               or (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
               for n in ast.walk(tree))


def humaneval_program(code: str, gt: Mapping[str, Any], marker: str, case_timeout_s: float = 1.0) -> str:
    """Program + tests + check(entry_point) + `marker` printed only if check() returned; each
    candidate call limited to `case_timeout_s`."""
    entry = gt["entry_point"]
    if not _defines(code, entry) and gt.get("prompt"):
        code = str(gt["prompt"]) + "\n" + code  # completion-style answer: body without header
    wrapper = f"""

def __flowrl_timed(fn, limit={case_timeout_s!r}):
    import signal as _sig, functools as _ft
    def _alarm(signum, frame):
        raise TimeoutError("test case exceeded {case_timeout_s}s")
    @_ft.wraps(fn)
    def _call(*a, **k):
        _old = _sig.signal(_sig.SIGALRM, _alarm)
        _sig.setitimer(_sig.ITIMER_REAL, limit)
        try:
            return fn(*a, **k)
        finally:
            _sig.setitimer(_sig.ITIMER_REAL, 0)
            _sig.signal(_sig.SIGALRM, _old)
    return _call

check(__flowrl_timed({entry}))
import sys as _flowrl_sys
_flowrl_sys.stdout.write("\\n{marker}\\n")
_flowrl_sys.stdout.flush()
"""
    return _HIDE_SOURCE + code + "\n\n" + str(gt["test"]) + "\n" + wrapper


def score_code(data_source: str, response: str, ground_truth: Mapping[str, Any], *,
               limits: CodeLimits = CodeLimits(), sandbox: SandboxConfig | None = None) -> float:
    """1.0 iff the last code block in `response` passes all tests of `ground_truth`, else 0.0."""
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)  # data files sometimes store tests as JSON text
    if not isinstance(ground_truth, Mapping):
        raise TypeError(f"code reward ({data_source}): ground_truth must be a dict, got "
                        f"{type(ground_truth).__name__}")
    code = extract_code(response)
    if code is None:
        return 0.0
    if "test" in ground_truth and "entry_point" in ground_truth:
        marker = _new_marker()
        program = humaneval_program(code, ground_truth, marker, limits.humaneval_case_s)
        res = run_python(program, "", humaneval_budget_s(str(ground_truth["test"]), limits), sandbox)
        # exit 0 alone is not enough: sys.exit(0) before check() would otherwise "pass"
        return 1.0 if res.ok and marker in res.stdout else 0.0
    if "tests" not in ground_truth:
        raise ValueError(f"code reward ({data_source}): ground_truth needs 'tests' or "
                         f"'test'+'entry_point', got keys {sorted(ground_truth)}")
    tests = list(ground_truth["tests"])
    starter = str(ground_truth.get("starter_code") or "")
    if data_source == "codeforces":
        ok = run_io_tests(code, tests[: limits.codeforces_max_tests], limits.codeforces_s,
                          starter_code=starter, sandbox=sandbox)
    else:
        ok = run_io_tests(code, tests, limits.livecodebench_s, starter_code=starter,
                          preamble=LCB_PREAMBLE, sandbox=sandbox)
    return 1.0 if ok else 0.0
