"""Code rewards on real benchmark problems (the packaged data): hand-written correct and wrong
solutions."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from flowrl_jax import rewards
from flowrl_jax.data.registry import PACKAGED_DATA_DIR
from flowrl_jax.rewards.code_reward import (
    CodeLimits, extract_code, humaneval_budget_s, method_name, outputs_match, score_code,
)
from flowrl_jax.rewards.sandbox import isolation_mode

DATA = PACKAGED_DATA_DIR


def fence(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n\n```{tag}\n{code.strip()}\n```\n\nThis runs in O(n)."


@pytest.fixture(scope="module")
def lcb():
    probs = json.loads((DATA / "livecodebench" / "livecodebench.json").read_text())
    by_start = {}
    for p in probs:
        for key in ("Which element in A is the second largest", "exactly 9 positive divisors",
                    "There are n cities numbered from 0 to n - 1. Initially, there is a unidirectional",
                    "contains only set bits"):
            if key in p["problem"]:
                by_start[key] = p
    assert len(by_start) == 4
    return by_start


@pytest.fixture(scope="module")
def codeforces():
    probs = json.loads((DATA / "codeforces" / "codeforces.json").read_text())
    minmax = next(p for p in probs if "the minimum of $x$ and $y$, followed by the maximum" in p["problem"])
    perm = next(p for p in probs if "prefix maximum as an index" in p["problem"])
    return minmax, perm


def _jsonl_gz(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def heplus():
    return _jsonl_gz(DATA / "humanevalplus" / "HumanEvalPlus-OriginFmt.jsonl.gz")


@pytest.fixture(scope="module")
def human_eval():
    return _jsonl_gz(DATA / "humaneval" / "HumanEval.jsonl.gz")


def lcb_gt(p):
    return {"tests": p["tests"], "starter_code": p["starter_code"]}


# ------------------------------------------------------------------ pure helpers

def test_extract_code_variants():
    assert extract_code("```python\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```\nprint(2)\n```") == "print(2)\n"  # untagged
    assert extract_code("```py\nx=1\n```\ntext\n```python3\nprint(3)\n```\nbye") == "print(3)\n"
    assert extract_code("no code at all") is None
    assert extract_code("```python\n\n```") is None


def test_outputs_match_lcb_rules():
    assert outputs_match("3\n", "3")
    assert outputs_match("  1 2 3  \n\n", "1 2 3")  # trailing whitespace / newlines
    assert outputs_match("1  2\t3", "1 2 3")  # token-wise
    assert outputs_match("1.0", "1")  # Decimal comparison as in lcb_runner
    assert outputs_match("0.50 2", "0.5 2.000")
    assert outputs_match("Yes\r\nNo\r\n", "Yes\nNo")
    assert not outputs_match("0.333", "0.3333")
    assert not outputs_match("1\n2", "1")  # line count differs
    assert not outputs_match("yes", "Yes")
    assert not outputs_match("", "0")


def test_method_name_and_budget():
    assert method_name("class Solution:\n    def maxScore(self, nums: List[int]) -> int:\n") == "maxScore"
    assert method_name("") is None
    lim = CodeLimits()
    assert humaneval_budget_s("def check(candidate):\n    assert candidate(1) == 2\n", lim) == lim.humaneval_min_s
    many = "def check(candidate):\n    inputs = [" + ", ".join(["[1]"] * 200) + "]\n"
    assert humaneval_budget_s(many, lim) == pytest.approx(min(lim.humaneval_max_s, 2.0 + 0.25 * 200))
    assert humaneval_budget_s("def check(c):\n    inputs = [[1]] * 1\n" + "    assert c\n" * 30, lim) == 9.5


def test_missing_block_and_bad_ground_truth():
    assert rewards.score("livecodebench", "I think the answer is print(3)", {"tests": [{"input": "", "output": "3"}]}) == 0.0
    with pytest.raises(ValueError, match="needs 'tests'"):
        rewards.score("codeforces", fence("print(1)"), {"cases": []})
    with pytest.raises(ValueError, match="lacks 'input'/'output'"):
        rewards.score("codeforces", fence("print(1)"), {"tests": [{"stdin": "1"}]})
    with pytest.raises(TypeError, match="must be a dict"):
        rewards.score("humaneval", fence("print(1)"), 42)


# ------------------------------------------------------------------ LiveCodeBench

SECOND_LARGEST_OK = """
n = int(input())
a = list(map(int, input().split()))
second = sorted(a)[-2]
print(a.index(second) + 1)
"""
SECOND_LARGEST_BAD = """
n = int(input())
a = list(map(int, input().split()))
print(a.index(max(a)) + 1)
"""
NINE_DIVISORS_OK = """
import math
n = int(input())
r = math.isqrt(n)
sieve = bytearray([1]) * (r + 1)
sieve[0:2] = b"\\x00\\x00"
for i in range(2, math.isqrt(r) + 1):
    if sieve[i]:
        sieve[i * i::i] = bytearray(len(range(i * i, r + 1, i)))
primes = [i for i in range(r + 1) if sieve[i]]
count = sum(1 for p in primes if p ** 8 <= n)
j = len(primes) - 1
for i, p in enumerate(primes):  # p < q with p*q <= sqrt(n): (p q)^2 has 9 divisors
    while j > i and p * primes[j] > r:
        j -= 1
    if j <= i:
        break
    count += j - i
print(count)
"""
NINE_DIVISORS_BAD = NINE_DIVISORS_OK.replace("sum(1 for p in primes if p ** 8 <= n)", "0")  # forgets p^8

SHORTEST_OK = """
from collections import deque
class Solution:
    def shortestDistanceAfterQueries(self, n: int, queries: List[List[int]]) -> List[int]:
        adj = [[i + 1] for i in range(n - 1)] + [[]]
        out = []
        for u, v in queries:
            adj[u].append(v)
            dist = [-1] * n
            dist[0] = 0
            q = deque([0])
            while q:
                x = q.popleft()
                for y in adj[x]:
                    if dist[y] < 0:
                        dist[y] = dist[x] + 1
                        q.append(y)
            out.append(dist[n - 1])
        return out
"""
SHORTEST_BAD = SHORTEST_OK.replace("out.append(dist[n - 1])", "out.append(n - 1 - len(out))")
SETBITS_OK = """
class Solution:
    def smallestNumber(self, n: int) -> int:
        x = 1
        while x < n:
            x = 2 * x + 1
        return x
"""
SETBITS_BAD = """
class Solution:
    def smallestNumber(self, n: int) -> int:
        return 1 << n.bit_length()
"""


def test_lcb_stdin(lcb):
    p = lcb["Which element in A is the second largest"]
    assert rewards.score("livecodebench", fence(SECOND_LARGEST_OK), lcb_gt(p)) == 1.0
    assert rewards.score("livecodebench", fence(SECOND_LARGEST_OK, ""), lcb_gt(p)) == 1.0  # untagged
    assert rewards.score("livecodebench", fence(SECOND_LARGEST_BAD), lcb_gt(p)) == 0.0
    # an earlier (wrong) block does not count: the last block is the program
    two_blocks = fence(SECOND_LARGEST_BAD) + "\nWait, fixed:\n" + fence(SECOND_LARGEST_OK)
    assert rewards.score("livecodebench", two_blocks, lcb_gt(p)) == 1.0
    assert rewards.score("livecodebench", fence(SECOND_LARGEST_OK) + fence(SECOND_LARGEST_BAD), lcb_gt(p)) == 0.0


def test_lcb_stdin_future_import_and_exit(lcb):
    p = lcb["Which element in A is the second largest"]
    prog = "from __future__ import annotations\n" + SECOND_LARGEST_OK + "exit()\nprint('unreachable')\n"
    assert rewards.score("livecodebench", fence(prog), lcb_gt(p)) == 1.0
    assert rewards.score("codeforces", fence(prog), {"tests": p["tests"]}) == 1.0


def test_lcb_stdin_all_tests_must_pass(lcb):
    p = lcb["exactly 9 positive divisors"]
    assert rewards.score("livecodebench", fence(NINE_DIVISORS_OK), lcb_gt(p)) == 1.0
    # the wrong program passes the first test (200 -> 3) and fails the second
    first_only = {"tests": p["tests"][:1], "starter_code": ""}
    assert rewards.score("livecodebench", fence(NINE_DIVISORS_BAD), first_only) == 1.0
    assert rewards.score("livecodebench", fence(NINE_DIVISORS_BAD), lcb_gt(p)) == 0.0


def test_lcb_functional(lcb):
    p = lcb["There are n cities numbered from 0 to n - 1. Initially, there is a unidirectional"]
    assert p["tests"][0]["testtype"] == "functional"
    assert rewards.score("livecodebench", fence(SHORTEST_OK), lcb_gt(p)) == 1.0
    assert rewards.score("livecodebench", fence(SHORTEST_BAD), lcb_gt(p)) == 0.0
    q = lcb["contains only set bits"]
    assert rewards.score("livecodebench", fence(SETBITS_OK, "py"), lcb_gt(q)) == 1.0
    assert rewards.score("livecodebench", fence(SETBITS_BAD), lcb_gt(q)) == 0.0
    # numpy results compare by value (as in LCB); a set is not a list
    np_ok = "import numpy as np\n" + SETBITS_OK.replace("return x", "return np.int64(x)")
    assert rewards.score("livecodebench", fence(np_ok), lcb_gt(q)) == 1.0
    assert rewards.score("livecodebench", fence(SETBITS_OK.replace("return x", "return {x}")), lcb_gt(q)) == 0.0
    # stray prints do not confuse the result channel; tests as a JSON string are accepted
    noisy = SETBITS_OK.replace("x = 1\n", "x = 1\n        print('debug', n)\n")
    assert rewards.score("livecodebench", fence(noisy), json.dumps(lcb_gt(q))) == 1.0


def test_functional_exit_hack_gets_zero(lcb):
    q = lcb["contains only set bits"]
    hack = "import os\nos._exit(0)\n" + SETBITS_BAD
    assert rewards.score("livecodebench", fence(hack), lcb_gt(q)) == 0.0
    # printing what looks like a result does not help either
    fake = "print('7')\nprint('15')\nimport sys\nsys.exit(0)\n"
    assert rewards.score("livecodebench", fence(fake), lcb_gt(q)) == 0.0


def test_lcb_timeout_is_zero(lcb):
    p = lcb["Which element in A is the second largest"]
    t0 = time.monotonic()
    got = score_code("livecodebench", fence("while True:\n    pass"), lcb_gt(p),
                     limits=CodeLimits(livecodebench_s=1.0))
    assert got == 0.0
    assert time.monotonic() - t0 < 6.0


# ------------------------------------------------------------------ Codeforces

MINMAX_OK = """
t = int(input())
for _ in range(t):
    x, y = map(int, input().split())
    print(min(x, y), max(x, y))
"""
MINMAX_BAD = MINMAX_OK.replace("print(min(x, y), max(x, y))", "print(x, y)")
PERM_OK = """
from itertools import permutations
MOD = 998244353
n = int(input())
a = list(map(int, input().split()))
b = list(map(int, input().split()))
c = list(map(int, input().split()))
res = []
for m in range(1, n + 1):
    total = 0
    for u in permutations(range(1, m + 1)):
        x = sum(1 for i in range(m) if all(u[i] > u[j] for j in range(i)))
        y = sum(1 for i in range(m) if all(u[i] > u[j] for j in range(i + 1, m)))
        z = sum(1 for i in range(1, m) if u[i] > u[i - 1])
        total = (total + a[x - 1] * b[y - 1] * c[z]) % MOD
    res.append(total)
print(*res)
"""
PERM_BAD = PERM_OK.replace("% MOD", "")  # right on small values, wrong once products exceed MOD


def test_codeforces(codeforces):
    minmax, perm = codeforces
    assert rewards.score("codeforces", fence(MINMAX_OK), {"tests": minmax["tests"]}) == 1.0
    assert rewards.score("codeforces", fence(MINMAX_BAD), {"tests": minmax["tests"]}) == 0.0
    assert len(perm["tests"]) == 3
    assert rewards.score("codeforces", fence(PERM_OK), {"tests": perm["tests"]}) == 1.0
    assert rewards.score("codeforces", fence(PERM_BAD), {"tests": perm["tests"][:2]}) == 1.0
    assert rewards.score("codeforces", fence(PERM_BAD), {"tests": perm["tests"]}) == 0.0


# ------------------------------------------------------------------ HumanEval(+)

CLOSE_OK = """
def has_close_elements(numbers, threshold):
    s = sorted(numbers)
    return any(b - a < threshold for a, b in zip(s, s[1:]))
"""
CLOSE_BAD = CLOSE_OK.replace("b - a < threshold", "b - a <= threshold")  # off at equality
CLOSE_BODY = "    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n"
TRUNC_OK = "def truncate_number(number: float) -> float:\n    return number - int(number)\n"
TRUNC_BAD = "def truncate_number(number: float) -> float:\n    return round(number - int(number), 1)\n"


def he_gt(rec):
    return {"test": rec["test"], "entry_point": rec["entry_point"], "prompt": rec["prompt"]}


def test_humanevalplus(heplus):
    close, trunc = heplus["HumanEval/0"], heplus["HumanEval/2"]
    assert rewards.score("humanevalplus", fence(CLOSE_OK), he_gt(close)) == 1.0
    assert rewards.score("humanevalplus", fence(CLOSE_BAD), he_gt(close)) == 0.0
    # completion-style answer (body only): the prompt is prepended
    assert rewards.score("humanevalplus", "```python\n" + CLOSE_BODY + "```", he_gt(close)) == 1.0
    assert rewards.score("humanevalplus", fence(TRUNC_OK), he_gt(trunc)) == 1.0
    assert rewards.score("humanevalplus", fence(TRUNC_BAD), he_gt(trunc)) == 0.0


def test_humaneval_original(human_eval):
    close, trunc = human_eval["HumanEval/0"], human_eval["HumanEval/2"]
    assert rewards.score("humaneval", fence(CLOSE_OK), he_gt(close)) == 1.0
    assert rewards.score("humaneval", fence(CLOSE_BAD.replace("<=", "< 2 *")), he_gt(close)) == 0.0
    assert rewards.score("humaneval", fence(TRUNC_OK), he_gt(trunc)) == 1.0
    assert rewards.score("humaneval", fence("def truncate_number(number):\n    return int(number)\n"),
                         he_gt(trunc)) == 0.0


def test_humaneval_exit_hacks_and_slow_case(heplus):
    close = heplus["HumanEval/0"]
    for hack in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                 "import os, sys\nprint(open(sys.argv[0]).read())\n"):
        assert rewards.score("humanevalplus", fence(hack + CLOSE_BAD), he_gt(close)) == 0.0
    slow = "import time\ndef has_close_elements(numbers, threshold):\n    time.sleep(3)\n    return False\n"
    t0 = time.monotonic()
    assert rewards.score("humanevalplus", fence(slow), he_gt(close)) == 0.0  # 1 s per case
    assert time.monotonic() - t0 < 5.0


def test_pool_mixed_batch(lcb, codeforces, heplus):
    assert isolation_mode()[0] in ("namespaces", "plain")
    p = lcb["Which element in A is the second largest"]
    items = [
        ("livecodebench", fence(SECOND_LARGEST_OK), lcb_gt(p)),
        ("livecodebench", fence(SECOND_LARGEST_BAD), lcb_gt(p)),
        ("codeforces", fence(MINMAX_OK), {"tests": codeforces[0]["tests"]}),
        ("humanevalplus", fence(CLOSE_OK), he_gt(heplus["HumanEval/0"])),
        ("humanevalplus", "no code", he_gt(heplus["HumanEval/0"])),
        ("math_dapo", "Answer: 3", "3"),
    ]
    with rewards.RewardPool(num_workers=3) as pool:
        assert pool.score_batch(items) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
