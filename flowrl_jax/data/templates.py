"""Prompt templates (SPEC §3 math; LiveCodeBench-style code; HumanEval completion) and chat rendering."""

from __future__ import annotations

from typing import Any, Optional

from flowrl_jax.data.records import Record

# SPEC §3 (the DAPO / FlowRL wrapper), exact string.
MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    "\n\n{problem}\n\nRemember to put your answer on its own line after \"Answer:\"."
)

# LiveCodeBench (lcb_runner / rllm) code-generation prompt, data/GRADING.md.
CODE_PREFIX = (
    "You are an expert Python programmer. You will be given a question (problem specification) "
    "and will generate a correct Python program that matches the specification and passes all "
    "tests.\n\n"
)
CODE_STARTER = (
    "### Format: You will use the following starter code to write the solution to the problem "
    "and enclose your code within delimiters.\n```python\n{starter_code}\n```\n\n"
)
CODE_STDIN = (
    "### Format: Read the inputs from stdin solve the problem and write the answer to stdout "
    "(do not directly test on the sample inputs). Enclose your code within delimiters as "
    "follows. Ensure that when the python program runs, it reads the inputs, runs the algorithm "
    "and writes output to STDOUT.\n```python\n# YOUR CODE HERE\n```\n\n"
)
CODE_ANSWER = "### Answer: (use the provided format with backticks)\n\n"

# HumanEval(+): complete the given function; the grader runs prompt-independent code, so the
# model is asked for the whole function (signature included) in one fenced block.
HUMANEVAL_TEMPLATE = (
    "You are an expert Python programmer. Complete the following Python function so that it "
    "is correct and passes all tests. Return the complete function (with its signature and any "
    "imports it needs) in a single Python code block.\n\n```python\n{prompt}\n```\n\n"
    + CODE_ANSWER
)

TEMPLATES = ("math", "code", "none")


def code_prompt(problem: str, ground_truth: Any) -> str:
    """The code prompt: HumanEval completion when there is an entry point, else LCB style."""
    gt = ground_truth if isinstance(ground_truth, dict) else {}
    if "entry_point" in gt:
        return HUMANEVAL_TEMPLATE.format(prompt=gt.get("prompt", problem).rstrip())
    starter = gt.get("starter_code") or ""
    fmt = CODE_STARTER.format(starter_code=starter) if starter.strip() else CODE_STDIN
    return CODE_PREFIX + problem + "\n\n" + fmt + CODE_ANSWER


def apply_template(record: Record, template: Optional[str] = None) -> str:
    """The user message for `record` under `template` (`auto`/None → the record's own kind)."""
    kind = record.template if template in (None, "auto") else template
    if kind == "math":
        return MATH_TEMPLATE.format(problem=record.prompt)
    if kind == "code":
        return code_prompt(record.prompt, record.ground_truth)
    if kind == "none":
        return record.prompt
    raise ValueError(f"unknown prompt template {kind!r} (known: {', '.join(TEMPLATES)}, auto)")


class ChatRenderer:
    """Wraps a user message in the tokenizer's chat template (with the generation prompt).

    The template is rendered once around a sentinel and reused as prefix + message + suffix,
    which is exact for templates that insert the message verbatim (Qwen's do) and avoids a
    Jinja render per prompt; other templates are rendered per message.
    """

    _SENTINELS = ("\x00FLOWRL_MSG_A\x00", "\x00FLOWRL_MSG_B\x00")

    def __init__(self, tokenizer: Any, enabled: bool = True, system: Optional[str] = None):
        self.tokenizer = tokenizer
        self.enabled = enabled and getattr(tokenizer, "chat_template", None) is not None
        self.system = system
        self._affix: Optional[tuple[str, str]] = None
        if self.enabled:
            a, b = (self._render_slow(s) for s in self._SENTINELS)
            sa, sb = self._SENTINELS
            if a.count(sa) == 1 and b.count(sb) == 1 and a.replace(sa, sb) == b:
                pre, post = a.split(sa)
                self._affix = (pre, post)

    def _render_slow(self, message: str) -> str:
        msgs = [{"role": "user", "content": message}]
        if self.system is not None:
            msgs.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, message: str) -> str:
        """The full prompt text for one user message."""
        if not self.enabled:
            return message
        if self._affix is not None:
            return self._affix[0] + message + self._affix[1]
        return self._render_slow(message)
