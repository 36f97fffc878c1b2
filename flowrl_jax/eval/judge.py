"""Optional LLM judge for solution diversity (1–5 scale, SPEC §6), off by default.

Talks to any OpenAI-compatible ``/chat/completions`` endpoint with the standard library
only. Configuration comes from the environment, never from the repository:

* ``FLOWRL_JUDGE_URL``     base URL (``http://host:port/v1``) or the full
  ``.../chat/completions`` URL. Unset → the judge is off.
* ``FLOWRL_JUDGE_API_KEY`` bearer token (optional for local servers).
* ``FLOWRL_JUDGE_MODEL``   model name sent in the request (default ``gpt-4o-mini``).
* ``FLOWRL_JUDGE_TIMEOUT`` seconds per request (default 60), ``FLOWRL_JUDGE_RETRIES``
  attempts per problem (default 3, capped at 10).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

from flowrl_jax.errors import EvalError

RUBRIC = """You are judging how DIVERSE a set of solutions to the same problem are.
Look only at the reasoning strategies, not at whether the answers are correct.

Score the set on a 1-5 scale:
1 = Essentially identical: every solution follows the same approach with the same steps;
    differences are only wording, formatting or arithmetic order.
2 = Minor variation: one shared approach; a few solutions reorder steps, add checks or
    use a small alternative sub-step.
3 = Moderate diversity: two clearly different approaches appear, or one approach with
    substantially different intermediate reasoning in several solutions.
4 = High diversity: three or more distinct approaches (e.g. algebraic, geometric,
    casework, generating functions) with real differences in the key idea.
5 = Highly diverse: most solutions use a distinct method or key insight; hardly any two
    share the same solution path.

Reply with a short justification, then a final line of the form "Score: N" where N is an
integer from 1 to 5."""

MAX_RETRIES = 10
_SCORE_LINE = re.compile(r"score\s*[:=]\s*\**\s*([1-5](?:\.\d+)?)\b", re.IGNORECASE)
_BARE = re.compile(r"(?<![\d.])([1-5])(?:\s*/\s*5)?(?![\d.])")


class JudgeError(EvalError):
    """The judge endpoint failed or never gave a parseable score."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge."""

    url: str
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_chars_per_solution: int = 300

    @property
    def endpoint(self) -> str:
        """Full chat-completions URL."""
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


def config_from_env(env: dict[str, str] | None = None) -> JudgeConfig | None:
    """JudgeConfig from FLOWRL_JUDGE_* variables, or None (judge off) when the URL is unset."""
    env = dict(os.environ) if env is None else env
    url = env.get("FLOWRL_JUDGE_URL", "").strip()
    if not url:
        return None
    try:
        timeout = float(env.get("FLOWRL_JUDGE_TIMEOUT", "60"))
        retries = int(env.get("FLOWRL_JUDGE_RETRIES", "3"))
    except ValueError as e:
        raise ValueError(f"bad FLOWRL_JUDGE_TIMEOUT/FLOWRL_JUDGE_RETRIES: {e}") from e
    return JudgeConfig(url=url, model=env.get("FLOWRL_JUDGE_MODEL", "gpt-4o-mini"),
                       api_key=env.get("FLOWRL_JUDGE_API_KEY") or None,
                       timeout_s=max(1.0, timeout), retries=min(max(1, retries), MAX_RETRIES))


def parse_score(text: str) -> float | None:
    """The judge's score: last 'Score: N' line, else a lone 1–5 on the last non-empty line."""
    found = _SCORE_LINE.findall(text or "")
    if found:
        return float(found[-1])
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    if lines:
        bare = _BARE.findall(lines[-1])
        if len(bare) == 1:
            return float(bare[0])
    return None


def build_messages(problem: str, solutions: Sequence[str], max_chars: int) -> list[dict[str, str]]:
    """Chat messages: rubric as system prompt, problem + truncated numbered solutions as user."""
    parts = [f"Problem:\n{problem}\n"]
    for i, s in enumerate(solutions, 1):
        parts.append(f"Solution {i}:\n{s[:max_chars]}\n")
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": "\n".join(parts)}]


def _post(cfg: JudgeConfig, payload: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    req = urllib.request.Request(cfg.endpoint, data=json.dumps(payload).encode(), headers=headers,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 - user URL
        return json.loads(resp.read().decode("utf-8"))


def _error_detail(e: urllib.error.HTTPError) -> str:
    """": message" from an OpenAI-style error body (e.g. an unknown FLOWRL_JUDGE_MODEL), or ""."""
    try:
        msg = json.loads(e.read().decode("utf-8"))["error"]["message"]
    except Exception:  # noqa: BLE001 - any other body: the status code alone
        return ""
    return f": {str(msg)[:300]}"


def judge_problem(cfg: JudgeConfig, problem: str, solutions: Sequence[str]) -> dict[str, Any]:
    """Ask the judge once per problem (bounded retries); returns score and raw reply."""
    payload = {"model": cfg.model, "temperature": 0.0, "max_tokens": 512,
               "messages": build_messages(problem, solutions, cfg.max_chars_per_solution)}
    errors: list[str] = []
    for attempt in range(cfg.retries):
        try:
            reply = _post(cfg, payload)
            content = reply["choices"][0]["message"]["content"]
            score = parse_score(content)
            if score is not None:
                return {"score": score, "reply": content, "attempts": attempt + 1}
            errors.append(f"attempt {attempt + 1}: no score in reply {content[:120]!r}")
        except urllib.error.HTTPError as e:
            errors.append(f"attempt {attempt + 1}: HTTP {e.code}{_error_detail(e)}")
            if e.code in (400, 401, 403, 404):  # not transient: do not hammer the endpoint
                break
        except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError,
                IndexError, TypeError) as e:
            errors.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
        if attempt + 1 < cfg.retries:
            time.sleep(cfg.backoff_s * (2 ** attempt))
    raise JudgeError(f"judge at {cfg.endpoint} gave no score: " + "; ".join(errors))


def judge_benchmark(cfg: JudgeConfig | None, problems: dict[str, str],
                    solutions: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Judge every problem; failures are recorded per problem, never fatal. Off → status only."""
    if cfg is None:
        return {"enabled": False, "note": "LLM judge off (set FLOWRL_JUDGE_URL to enable)."}
    per: dict[str, Any] = {}
    for pid, sols in solutions.items():
        try:
            per[pid] = judge_problem(cfg, problems.get(pid, ""), sols)
        except JudgeError as e:
            per[pid] = {"score": None, "error": str(e)}
    scores = [v["score"] for v in per.values() if v.get("score") is not None]
    return {"enabled": True, "model": cfg.model,
            "mean_score": sum(scores) / len(scores) if scores else None,
            "num_scored": len(scores), "num_failed": len(per) - len(scores), "per_problem": per}
