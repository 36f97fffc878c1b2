"""One served request with its own sampling settings: the part of `serve` that both protocols
share (the OpenAI-compatible HTTP endpoint, and gRPC requests that carry settings).

A request is validated into `SamplingParams` (temperature, top-p, top-k, min-p, max tokens,
n, seed, stop strings / ids) and run through `SamplingEngine.generate`, one request at a
time. Each distinct (temperature, top-p, top-k, min-p) compiles its own decode once (the
sampler's static spec); the defaults of `serve` are compiled when the first request uses them.
Bad requests raise `SamplingError` with a message for the client; the server stays up.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.params import SamplingError, SamplingParams

MAX_N = 64  # samples per request
MAX_STOP = 8  # stop strings per request (OpenAI allows 4; a little slack)
#: gRPC metadata key carrying per-request sampling settings (the JetStream DecodeRequest has
#: only max_tokens): a JSON object with the OpenAI field names that `params_from` reads.
SAMPLING_METADATA_KEY = "x-flowrl-sampling"
# OpenAI fields this server does not implement: refused when set, never silently ignored
UNSUPPORTED = {"stream": False, "echo": False, "logprobs": None, "top_logprobs": None,
               "suffix": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "tools": None, "response_format": None}


@dataclass(frozen=True)
class Choice:
    """One generated sample of a request."""

    token_ids: list[int]  # without a final stop token
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass
class Completion:
    """All samples of one request and its token counts."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int = field(default=0)


def _number(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """body[key] as int/float (None or absent → default); a clear error names the field."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise SamplingError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {v!r}")
    return kind(v)


class CompletionService:
    """Per-request sampling on a loaded model; thread-safe (requests run one at a time)."""

    def __init__(self, core: SamplingEngine, params: Any, tokenizer: Any,
                 defaults: SamplingParams, *, max_new_tokens_limit: int):
        self.core = core
        self.params = core.params_of(params)
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.context = int(core.arch.max_position_embeddings)
        self._lock = threading.Lock()
        self._requests = itertools.count(1)

    # ----------------------------------------------------------------- requests → params

    def params_from(self, body: Mapping[str, Any]) -> tuple[SamplingParams, tuple[str, ...]]:
        """(SamplingParams, stop strings) from OpenAI-style fields: temperature, top_p, top_k,
        min_p, max_tokens, n, seed, stop (str | [str] | [int] token ids), ignore_eos."""
        d = self.defaults
        for key, off in UNSUPPORTED.items():
            if body.get(key, off) not in (off, None, False, {}, []):
                raise SamplingError(f"{key} is not supported by this server")
        best_of = body.get("best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise SamplingError("best_of is not supported by this server (use n)")
        max_tokens = _number(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", int, d.max_new_tokens)
        if max_tokens <= 0:
            raise SamplingError(f"max_tokens must be > 0, got {max_tokens}")
        if max_tokens > self.max_new_tokens_limit:
            raise SamplingError(f"max_tokens {max_tokens} exceeds this server's limit "
                                f"{self.max_new_tokens_limit} (serve --max-new-tokens)")
        n = _number(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise SamplingError(f"n must be in [1, {MAX_N}], got {n}")
        seed = _number(body, "seed", int, None)
        if seed is None:  # unseeded requests differ from each other, reproducibly per server
            seed = d.seed + next(self._requests)
        stop = body.get("stop")
        stop_ids: tuple[int, ...] = ()
        stop_text: tuple[str, ...] = ()
        if isinstance(stop, str):
            stop_text = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop_text = tuple(stop)
        elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool)
                                            for s in stop):
            stop_ids = tuple(stop)
        elif stop is not None:
            raise SamplingError(f"stop must be a string or a list of strings (or of token ids), "
                                f"got {stop!r}")
        if len(stop_text) + len(stop_ids) > MAX_STOP or any(s == "" for s in stop_text):
            raise SamplingError(f"stop: at most {MAX_STOP} non-empty entries")
        ignore_eos = body.get("ignore_eos", d.ignore_eos)
        if not isinstance(ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false, got {ignore_eos!r}")
        sp = SamplingParams(
            temperature=_number(body, "temperature", float, d.temperature),
            top_p=_number(body, "top_p", float, d.top_p),
            top_k=_number(body, "top_k", int, d.top_k),
            min_p=_number(body, "min_p", float, d.min_p),
            max_new_tokens=max_tokens, n=n, seed=seed % 2**31, ignore_eos=ignore_eos,
            stop_token_ids=tuple(d.stop_token_ids) + stop_ids)
        sp.validate()
        return sp, stop_text

    # ----------------------------------------------------------------- prompts

    def encode(self, prompt: Any) -> list[int]:
        """Token ids of a text prompt or a list of token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise SamplingError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if (isinstance(prompt, list) and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            vocab = self.core.arch.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise SamplingError(f"prompt: token id {bad[0]} is outside the vocabulary "
                                    f"[0, {vocab})")
            return list(prompt)
        raise SamplingError("prompt must be a non-empty string or a list of token ids "
                            "(one prompt per request)")

    def render_chat(self, messages: Any) -> list[int]:
        """Token ids of chat messages rendered with the tokenizer's chat template."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise SamplingError("messages must be a non-empty list of {role, content} objects "
                                "with string content")
        if not getattr(self.tokenizer, "chat_template", None):
            raise SamplingError("the served tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_context(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Refuse a prompt that cannot fit the model's context with its max tokens."""
        n = len(prompt_ids)
        if n + max_new_tokens > self.context:
            raise SamplingError(
                f"this model's maximum context length is {self.context} tokens; the prompt has "
                f"{n} tokens and max_tokens is {max_new_tokens} ({n + max_new_tokens} in all): "
                f"shorten the prompt or lower max_tokens")

    # ----------------------------------------------------------------- generation

    def complete(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 stop: Sequence[str] = ()) -> Completion:
        """Sample `sampling.n` responses to one prompt; stop strings cut the text."""
        self.check_context(prompt_ids, sampling.max_new_tokens)
        stop_ids = {int(t) for t in self.core.stop_ids_for(sampling) if t >= 0}
        with self._lock:
            out = self.core.generate(self.params, [list(prompt_ids)], sampling)
        choices = []
        for i in range(len(out.lengths)):
            ids = out.tokens[i, :int(out.lengths[i])].tolist()
            reason = str(out.finish_reasons[i])
            if reason == "stop" and ids and ids[-1] in stop_ids:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = [text.find(s) for s in stop if s in text]
            if cut:
                text, reason = text[:min(cut)], "stop"
            choices.append(Choice(ids, text, reason))
        return Completion(choices, len(prompt_ids), sum(len(c.token_ids) for c in choices))


def sampling_from_metadata(metadata: Optional[Sequence[tuple[str, Any]]]) -> Optional[dict]:
    """The JSON sampling settings a gRPC client sent as `x-flowrl-sampling`, or None."""
    for key, value in metadata or ():
        if key == SAMPLING_METADATA_KEY:
            try:
                body = json.loads(value)
            except (TypeError, ValueError) as e:
                raise SamplingError(f"{SAMPLING_METADATA_KEY}: not a JSON object ({e})") from e
            if not isinstance(body, dict):
                raise SamplingError(f"{SAMPLING_METADATA_KEY}: not a JSON object")
            return body
    return None
