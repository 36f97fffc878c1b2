"""Math rewards: DAPO "Answer:" exact match (hand cases), Math-Verify scorer incl. timeouts, registry."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
import time

import pytest

from flowrl_jax import rewards
from flowrl_jax.rewards.math_dapo import extract_answer, math_dapo_score, normalize_final_answer
from flowrl_jax.rewards.math_eval import MathVerifyScorer

PAD = "Let me think about this step by step. " * 20  # 760 chars of reasoning

# (response, ground truth, expected reward) — expectations worked out by hand from the
# Minerva rules: text after last "=", substitutions, unit words removed, \text/\boxed/$ unwrapped.
DAPO_CASES = [
    ("Answer: 42", "42", 1.0),
    ("Answer: 41", "42", -1.0),
    ("answer: 42", "42", 1.0),  # case-insensitive
    ("ANSWER : 42", "42", 1.0),  # whitespace before the colon
    ("Answer:42", "42", 1.0),
    ("Answer: 7\nmore thoughts\nAnswer: 42", "42", 1.0),  # the last match wins
    ("Answer: 7\nmore thoughts\nAnswer: 42", "7", -1.0),
    ("The result is 42.", "42", -1.0),  # no Answer line
    ("", "42", -1.0),
    ("Answer: 42\n" + "z" * 400, "42", -1.0),  # answer beyond the last 300 characters
    (PAD + "\nAnswer: 42", "42", 1.0),  # long response, answer in the tail
    ("Answer: 42\n" + "z" * 292, "42", -1.0),  # tail starts inside "Answer" (303 chars)
    ("Answer: 42\n" + "z" * 289, "42", 1.0),  # exactly 300 chars: still found
    ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}", 1.0),
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0),  # shorthand \frac12 -> \frac{1}{2}
    ("Answer: 1/2", "\\frac{1}{2}", -1.0),  # exact match only, no symbolic step
    ("Answer: 0.5", "\\frac{1}{2}", -1.0),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", -1.0),  # \dfrac is not in the Minerva list
    ("Answer: \\boxed{42}", "42", 1.0),
    ("so the answer is \\boxed{42}", "42", -1.0),  # boxed but no Answer: line
    ("Answer: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("Answer: 42 degrees", "42", 1.0),  # unit word removed
    ("Answer: 5 cm", "5", 1.0),
    ("Answer: 10 points", "10", 1.0),
    ("Answer: 4 \\text{ cm}^2", "4", 1.0),  # cm removed, then \text{}^2
    ("Answer: 90^\\circ", "90", 1.0),
    ("Answer: \\$42", "42", 1.0),  # escaped dollar
    ("Answer: 1,000", "1000", 1.0),  # thousands separator on a pure number
    ("Answer: x = 5", "5", 1.0),  # text after the last "="
    ("Answer: \\text{(B)}", "(B)", 1.0),
    ("Answer: \\textbf{7}", "7", 1.0),
    ("Answer: 42.", "42", -1.0),  # a bare trailing period is kept
    ("Answer: $42.$", "42", 1.0),  # ".$" -> "$"
    ("Answer: $x^2+1$", "x^2+1", 1.0),
    ("Answer: x^2 + 1", "x^2+1", 1.0),  # spaces removed
    ("Answer: \\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", -1.0),
    ("Answer: 3\\sqrt2", "3\\sqrt{2}", 1.0),  # shorthand \sqrt2
    ("Answer: 42 is the final result", "42", -1.0),  # trailing words stay
    ("Answer: 42\nThus we are done.", "42", 1.0),  # the match stops at the newline
    ("Answer: -3", "-3", 1.0),
    ("Answer: -3", "3", -1.0),
    ("Answer: 5", "5 \\text{ cm}", 1.0),  # the gold answer is normalised too
    ("Answer: 25", "025", -1.0),  # exact string match
]


@pytest.mark.parametrize("response,gt,expected", DAPO_CASES)
def test_math_dapo_hand_cases(response, gt, expected):
    assert math_dapo_score(response, gt) == expected
    assert rewards.score("math_dapo", response, gt) == expected


def test_dapo_case_count():
    assert len(DAPO_CASES) >= 30


@pytest.mark.parametrize("raw,norm", [
    ("x = \\frac12", "\\frac{1}{2}"),
    ("\\text{Monday}", "Monday"),
    ("$12,345$", "12345"),
    ("an apple a day", "appleday"),  # "an " and "a " are deleted (Minerva quirk)
    ("\\boxed{\\sqrt3}", "\\sqrt{3}"),
    ("5 \\text{ inches}", "5"),
])
def test_normalize_final_answer(raw, norm):
    assert normalize_final_answer(raw) == norm


def test_extract_answer():
    assert extract_answer("x\nAnswer: 12 apples\nend") == "12 apples"
    assert extract_answer("no answer here") is None


def test_math_dapo_aliases():
    for src in ("dapo_math_17k", "math_train"):
        assert rewards.resolve(src) == "math_dapo"
        assert rewards.score(src, "Answer: 17", "17") == 1.0
        assert rewards.score(src, "Answer: 18", "17") == -1.0


# ------------------------------------------------------------------ Math-Verify

MV_CASES = [
    ("so the answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("The angle is \\boxed{336^\\circ}", "336", 1.0),
    ("\\boxed{025}", "25", 1.0),
    ("Answer: 70", "70", 1.0),
    ("Answer: 71", "70", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # symbolic equality
    ("", "5", 0.0),
    ("I don't know.", "5", 0.0),
]


@pytest.fixture(scope="module")
def mv_scorer():
    scorer = MathVerifyScorer(num_workers=2, timeout_s=20.0)
    yield scorer
    scorer.close()


@pytest.mark.parametrize("response,gt,expected", MV_CASES)
def test_math_verify_cases(mv_scorer, response, gt, expected):
    assert mv_scorer.score(response, gt) == expected


def test_math_verify_registry_and_aliases():
    assert rewards.score("math_verify", "\\boxed{12}", "12") == 1.0
    for src in ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k"):
        assert rewards.resolve(src) == "math_verify"
    assert rewards.score("math500", "\\boxed{\\frac{2}{4}}", "\\frac{1}{2}") == 1.0
    assert rewards.score("amc23", "\\boxed{27}", "27.0") == 1.0
    assert rewards.score("aime25", "\\boxed{28}", "27") == 0.0


def test_math_verify_from_threads(mv_scorer):
    # math-verify's own SIGALRM timeouts would raise in a non-main thread; ours must not.
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: mv_scorer.score(f"\\boxed{{{i}}}", str(i if i % 2 else i + 1)), range(8)))
    assert got == [0.0, 1.0] * 4


PATHOLOGICAL = "\\boxed{9^{9^{9^{9^{9}}}}}"  # sympy evaluates this power tower forever


def test_math_verify_timeout_pathological(caplog):
    # inner (signal) timeouts off: only the parent's wall-clock deadline can stop this call
    scorer = MathVerifyScorer(num_workers=1, timeout_s=1.0, inner_timeout_s=0)
    try:
        scorer.score("\\boxed{1}", "1")  # warm the worker up so startup is not timed
        caplog.set_level(logging.WARNING, logger="flowrl_jax.rewards.math_eval")
        t0 = time.monotonic()
        assert scorer.score(PATHOLOGICAL, "5") == 0.0
        elapsed = time.monotonic() - t0
        assert 0.9 < elapsed < 5.0
        assert scorer.num_timeouts == 1
        assert any("timed out" in r.getMessage() for r in caplog.records)
        assert scorer.score("\\boxed{7}", "7") == 1.0  # a fresh worker took over
    finally:
        scorer.close()


def test_math_verify_timeout_injected_slow_worker(caplog):
    slow = [sys.executable, "-c",
            "import sys, time\nprint('{\"ready\": true}', flush=True)\nfor _ in sys.stdin:\n    time.sleep(60)\n"]
    scorer = MathVerifyScorer(num_workers=1, timeout_s=0.5, worker_argv=slow)
    try:
        caplog.set_level(logging.WARNING, logger="flowrl_jax.rewards.math_eval")
        t0 = time.monotonic()
        assert scorer.score("\\boxed{1}", "1") == 0.0
        assert time.monotonic() - t0 < 3.0
        assert scorer.num_timeouts == 1
        assert any("timed out" in r.getMessage() for r in caplog.records)
    finally:
        scorer.close()


# ------------------------------------------------------------------ registry

def test_register_reward_decorator_and_errors():
    @rewards.register_reward("test_len_reward")
    def length_reward(response, gt):
        return float(len(response) == int(gt))

    try:
        assert rewards.score("test_len_reward", "abc", "3") == 1.0
        assert rewards.score("test_len_reward", "abcd", "3") == 0.0
        with pytest.raises(ValueError, match="already registered"):
            rewards.register_reward("test_len_reward", length_reward)
        rewards.register_reward("test_len_reward", lambda r, g: 0.5, overwrite=True)
        assert rewards.score("test_len_reward", "abc", "3") == 0.5
        rewards.register_alias("test_len_alias", "test_len_reward")
        assert rewards.score("test_len_alias", "x", "1") == 0.5
    finally:
        rewards.unregister_reward("test_len_reward")
        rewards.unregister_reward("test_len_alias")
    with pytest.raises(KeyError, match="no reward registered for data_source 'nope'"):
        rewards.score("nope", "x", "1")


def test_pool_math_and_custom_reward():
    rewards.register_reward("test_pool_custom", lambda r, g: 0.25)
    try:
        with rewards.RewardPool(num_workers=2) as pool:
            items = [("math_dapo", "Answer: 3", "3"), ("math_dapo", "Answer: 4", "3"),
                     ("math500", "\\boxed{\\frac{1}{2}}", "0.5"), ("gsm8k", "\\boxed{9}", "8"),
                     ("test_pool_custom", "", None)]
            assert pool.score_batch(items) == [1.0, -1.0, 1.0, 0.0, 0.25]
            fut = pool.submit("math_dapo", "Answer: 5", "5")
            assert fut.result(timeout=10) == 1.0
            with pytest.raises(KeyError):
                pool.submit("unknown_source", "x", "y")
    finally:
        rewards.unregister_reward("test_pool_custom")


def test_every_shipped_dataset_routes_to_a_reward():
    registry = pytest.importorskip("flowrl_jax.data.registry")
    sources = {info.data_source for info in registry.REGISTRY.values()}
    assert sources  # the data registry lists its data sets
    for src in sources:
        rewards.resolve(src)  # raises KeyError naming the source if it has no reward


def _worker_pids(scorer):
    return {w._proc.pid for w in scorer._workers if w._proc is not None}


def test_math_verify_scorer_survives_fork(mv_scorer):
    assert mv_scorer.score("\\boxed{3}", "3") == 1.0  # parent worker running
    parent_pids = _worker_pids(mv_scorer)
    assert parent_pids
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must start its own worker instead of sharing the parent's pipes
        try:
            ok = mv_scorer.score("\\boxed{4}", "4") == 1.0 and mv_scorer.score("\\boxed{5}", "4") == 0.0
            ok = ok and bool(_worker_pids(mv_scorer)) and not (_worker_pids(mv_scorer) & parent_pids)
            mv_scorer.close()
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    os.close(r)
    assert got == b"1"
    assert _worker_pids(mv_scorer) == parent_pids  # the child neither used nor killed them
    assert mv_scorer.score("\\boxed{6}", "6") == 1.0
