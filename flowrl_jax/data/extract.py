"""Gold-answer extraction rules of data/GRADING.md (Qwen2.5-Math `parse_ground_truth` style)."""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Optional

_NUM_WITH_COMMAS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with brace matching; None if absent."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        # `\boxed 5` (no braces) is how some solutions write a single token.
        m = list(re.finditer(r"\\boxed ([^\s$]+)", text))
        return m[-1].group(1) if m else None
    start = starts[-1]
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced braces


def number_to_str(x: Any) -> str:
    """A numeric gold answer as text: 27.0 → "27", 0.5 → "0.5"."""
    if isinstance(x, bool):
        raise TypeError("a boolean is not a numeric answer")
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isfinite(x) and x.is_integer():
            return str(int(x))
        return repr(x)
    if isinstance(x, str):
        return x.strip()
    raise TypeError(f"expected a number, got {type(x).__name__}")


def gsm8k_answer(solution: str) -> Optional[str]:
    """Text after the last `####`, with thousands separators removed (`1,000` → `1000`)."""
    if "####" not in solution:
        return None
    ans = solution.split("####")[-1].strip()
    if _NUM_WITH_COMMAS.match(ans):
        ans = ans.replace(",", "")
    return ans


def olympiad_answer(final_answer: Any) -> Optional[str]:
    """`final_answer[0].strip("$")` (OlympiadBench stores a 1-element list of `$...$`)."""
    if isinstance(final_answer, str):
        final_answer = [final_answer]
    if not isinstance(final_answer, list) or not final_answer or not isinstance(final_answer[0], str):
        return None
    return final_answer[0].strip().strip("$").strip()


def parse_tests(value: Any) -> list[dict]:
    """A list of test dicts from a list or its JSON / Python-literal string form."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = ast.literal_eval(value)  # some rllm exports store a Python repr
    if not isinstance(value, list):
        raise TypeError(f"tests must be a list, got {type(value).__name__}")
    return value
