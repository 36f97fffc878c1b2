"""The Countdown task: combine some of three given numbers with + − × to hit a target.

An answer is a left-to-right expression over 2 or 3 *distinct* given numbers (each at most
once) with the usual precedence (× before + and −), followed by EOS, e.g. `2*3+4` for
numbers (2, 3, 4) and target 10. Every problem has several valid answers of different
lengths (3 or 5 expression tokens), and all of them are enumerable (18 + 54 expressions),
so the reward-proportional target distribution is known exactly.

Token ids (a 32-token vocabulary): 0 pad, 1 BOS, 2 EOS, 3 `=`, 4 `:`, 5 `+`, 6 `-`, 7 `*`,
8…16 the numbers 1…9, 17…26 the target's decimal digits 0…9.
Prompt: BOS a b c = tens units :   (8 tokens, numbers ascending)
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PAD, BOS, EOS, EQUALS, COLON = 0, 1, 2, 3, 4
OPS = {5: "+", 6: "-", 7: "*"}
OP_TOKEN = {s: t for t, s in OPS.items()}
NUMBER_BASE = 7  # token of number n (1…9) is NUMBER_BASE + n
DIGIT_BASE = 17  # token of target digit d (0…9) is DIGIT_BASE + d
VOCAB_SIZE = 32
PROMPT_LENGTH = 8
MAX_ANSWER_TOKENS = 6  # 5 expression tokens + EOS
MAX_TARGET = 99


@dataclass(frozen=True)
class Problem:
    """Three distinct numbers in 1…9 (ascending) and a target in 1…99."""

    numbers: tuple[int, int, int]
    target: int

    def __post_init__(self) -> None:
        ns = self.numbers
        if len(ns) != 3 or len(set(ns)) != 3 or not all(1 <= n <= 9 for n in ns) \
                or list(ns) != sorted(ns):
            raise ValueError(f"Problem.numbers={ns!r}: need 3 distinct ascending numbers in 1…9")
        if not 1 <= self.target <= MAX_TARGET:
            raise ValueError(f"Problem.target={self.target}: must be in 1…{MAX_TARGET}")

    def prompt_ids(self) -> list[int]:
        """The prompt's token ids."""
        tens, units = divmod(self.target, 10)
        return [BOS, *(NUMBER_BASE + n for n in self.numbers), EQUALS,
                DIGIT_BASE + tens, DIGIT_BASE + units, COLON]

    def key(self) -> str:
        """A readable id, e.g. `2,3,4=10`."""
        return f"{','.join(map(str, self.numbers))}={self.target}"


def evaluate(expression: str) -> int:
    """Value of `a op b [op c]` with × before + and − (no parentheses, no unary minus)."""
    total, term, sign = 0, None, 1
    tokens = expression_tokens(expression)
    for i, tok in enumerate(tokens):
        if i % 2 == 0:
            if not tok.isdigit():
                raise ValueError(f"expression {expression!r}: expected a number at {i}")
            term = int(tok) if term is None else term * int(tok)
        elif tok == "*":
            continue
        elif tok in "+-":
            total += sign * term
            term, sign = None, (1 if tok == "+" else -1)
        else:
            raise ValueError(f"expression {expression!r}: unknown operator {tok!r}")
    if term is None:
        raise ValueError(f"expression {expression!r}: ends with an operator")
    return total + sign * term


def expression_tokens(expression: str) -> list[str]:
    """`2*3+4` → ['2', '*', '3', '+', '4'] (single-digit numbers)."""
    return list(expression.replace(" ", ""))


def all_expressions(numbers: Sequence[int]) -> list[str]:
    """Every answer shape over the numbers: ordered picks of 2 or 3 distinct ones, any ops."""
    return list(_expressions(tuple(numbers)))


@functools.lru_cache(maxsize=None)
def _expressions(numbers: tuple[int, ...]) -> tuple[str, ...]:
    out = []
    for k in (2, 3):
        for pick in itertools.permutations(numbers, k):
            for ops in itertools.product("+-*", repeat=k - 1):
                out.append(str(pick[0]) + "".join(o + str(n) for o, n in zip(ops, pick[1:])))
    return tuple(out)


def valid_answers(problem: Problem) -> list[str]:
    """Every valid answer of a problem (expressions whose value is the target), sorted."""
    return list(_valid(problem))


@functools.lru_cache(maxsize=None)
def _valid(problem: Problem) -> tuple[str, ...]:
    return tuple(sorted(e for e in _expressions(problem.numbers) if evaluate(e) == problem.target))


def encode_answer(expression: str) -> list[int]:
    """Token ids of an answer, EOS included."""
    ids = []
    for i, ch in enumerate(expression_tokens(expression)):
        ids.append(NUMBER_BASE + int(ch) if i % 2 == 0 else OP_TOKEN[ch])
    return ids + [EOS]


def decode_answer(ids: Sequence[int]) -> str | None:
    """The expression a response spells (tokens before the first EOS), or None if the
    response is malformed: no EOS, a token out of place, or not number-op alternation."""
    ids = [int(t) for t in ids]
    if EOS not in ids:
        return None
    body = ids[:ids.index(EOS)]
    if len(body) % 2 == 0:
        return None
    chars = []
    for i, t in enumerate(body):
        if i % 2 == 0 and NUMBER_BASE + 1 <= t <= NUMBER_BASE + 9:
            chars.append(str(t - NUMBER_BASE))
        elif i % 2 == 1 and t in OPS:
            chars.append(OPS[t])
        else:
            return None
    return "".join(chars)


def reward(problem: Problem, response: Sequence[int]) -> float:
    """1.0 when the response is a valid answer (2–3 distinct given numbers, value = target)."""
    expr = decode_answer(response)
    if expr is None:
        return 0.0
    used = [int(c) for c in expr[::2]]
    if not 2 <= len(used) <= 3 or len(set(used)) != len(used) \
            or any(n not in problem.numbers for n in used):
        return 0.0
    return 1.0 if evaluate(expr) == problem.target else 0.0


# --------------------------------------------------------------------------- problems


def all_problems(min_answers: int = 3, max_answers: int = 16) -> list[Problem]:
    """Every (numbers, target) whose number of valid answers is within the bounds."""
    out = []
    for numbers in itertools.combinations(range(1, 10), 3):
        counts: dict[int, int] = {}
        for e in all_expressions(numbers):
            v = evaluate(e)
            if 1 <= v <= MAX_TARGET:
                counts[v] = counts.get(v, 0) + 1
        out += [Problem(numbers, t) for t, c in sorted(counts.items())
                if min_answers <= c <= max_answers]
    return out


def split_problems(num_heldout: int, num_train: int | None = None, heldout_sets: int = 16,
                   seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) problems; held-out problems use number sets never trained on.
    `num_train` keeps a random subset of the training problems (None: all of them)."""
    problems = all_problems()
    sets = sorted({p.numbers for p in problems})
    rng = np.random.default_rng(seed)
    held = {sets[i] for i in rng.choice(len(sets), heldout_sets, replace=False)}
    train = [p for p in problems if p.numbers not in held]
    pool = [p for p in problems if p.numbers in held]
    if num_heldout > len(pool):
        raise ValueError(f"num_heldout={num_heldout}: only {len(pool)} held-out problems exist")
    pick = rng.choice(len(pool), num_heldout, replace=False)
    if num_train is not None:
        if not 0 < num_train <= len(train):
            raise ValueError(f"num_train={num_train}: must be in 1…{len(train)}")
        train = [train[i] for i in sorted(rng.choice(len(train), num_train, replace=False))]
    return train, [pool[i] for i in sorted(pick)]
