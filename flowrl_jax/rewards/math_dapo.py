"""DAPO-style math training reward (SPEC §3): last 300 chars, last "Answer:" line, Minerva normalisation, ±1."""

from __future__ import annotations

import re

# Only the tail of a response is searched: long chains of thought contain many
# intermediate "answers"; DAPO/FlowRL look at the final 300 characters.
TAIL_CHARS = 300
ANSWER_PATTERN = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)

# Minerva `normalize_final_answer` tables (same lists and order as veRL math_dapo.py).
# Order matters: e.g. "an " is stripped before spaces are removed.
_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_REMOVED: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm",
    "gm", "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
_UNWRAP = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),  # keep the first $...$ span
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
)
_FRAC_SHORT = re.compile(r"(frac)([^{])(.)")  # \frac12 -> \frac{1}{2}
_SQRT_SHORT = re.compile(r"(sqrt)([^{])")  # \sqrt2 -> \sqrt{2}


def normalize_final_answer(answer: str) -> str:
    """Minerva normalisation of a final answer string (exact-match ready)."""
    answer = answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for word in _REMOVED:
        answer = answer.replace(word, "")
    for pattern, repl in _UNWRAP:
        answer = pattern.sub(repl, answer)
    answer = _FRAC_SHORT.sub(r"frac{\2}{\3}", answer)
    answer = _SQRT_SHORT.sub(r"sqrt{\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # "1,000" -> "1000"
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(response: str) -> str | None:
    """Text after the last `Answer:` within the last 300 characters, or None."""
    matches = ANSWER_PATTERN.findall(response[-TAIL_CHARS:])
    return matches[-1] if matches else None


def math_dapo_score(response: str, ground_truth: str) -> float:
    """+1.0 if the normalised last `Answer:` equals the normalised ground truth, else -1.0."""
    extracted = extract_answer(response)
    if extracted is None:
        return -1.0
    pred = normalize_final_answer(extracted)
    gold = normalize_final_answer(str(ground_truth))
    return 1.0 if pred == gold else -1.0
