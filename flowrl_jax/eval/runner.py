"""`flowrl-jax eval`: sample n responses per problem, score them, write Avg@n / pass@k tables.

Output directory (``--out``):

* ``samples.jsonl``: one line per scored sample (benchmark, prompt_id, sample_index, text,
  num_tokens, score, finish_reason, data_source, gold, extracted), appended as scores arrive.
  A rerun with the same ``--out`` skips every (benchmark, prompt_id, sample_index) already there.
* ``eval_config.json``: what was evaluated — the model path, its digest (``model_digest``;
  eval/identity.py: HF weights, or the resolved Orbax step as ``model_step``) — and the
  settings that change samples (n, sampling, seed…), plus the latest run's ``benchmarks`` and
  ``limit``. A rerun onto another model or other settings is refused instead of mixing
  samples; ``--overwrite`` starts the output afresh.
* ``summary.json``: per-benchmark summaries, the six-benchmark math average, diversity,
  Codeforces extras and (optional) LLM-judge scores; ``results.md`` and ``<bench>.md``:
  the Markdown tables.

Determinism across resume: problems are cut into fixed chunks (``--batch-prompts`` problems
per chunk, in data order) and chunk c of benchmark b is sampled with a seed derived from
(seed, b, c). A resumed run regenerates only chunks with missing samples and keeps only
the missing ones, so with a deterministic sampler it reproduces the uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from flowrl_jax.data.registry import load_eval_set
from flowrl_jax.data.templates import apply_template
from flowrl_jax.eval.engine_backend import EngineBackend, resolve_dtype
from flowrl_jax.eval.generate import generate_and_score
from flowrl_jax.eval.identity import model_identity
from flowrl_jax.eval.judge import JudgeConfig
from flowrl_jax.eval.records import Backend, EvalError, Problem
from flowrl_jax.eval.resume import check_config, clear_outputs, read_samples
from flowrl_jax.eval.scoring import Scorer, sandboxed_score
from flowrl_jax.eval.suites import DIVERSITY_DEFAULT, KNOWN
from flowrl_jax.eval.summary import summarize, write_outputs
from flowrl_jax.rewards import RewardPool, SandboxConfig, isolation_mode, runs_code


@dataclass(frozen=True)
class EvalSettings:
    """One `flowrl-jax eval` run, its inputs already checked (see commands/eval.py)."""

    model: str
    out: Path
    benchmarks: Sequence[str]
    data_dir: Path
    n: int
    seed: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    limit: int | None  # first K problems per benchmark; None = all
    batch_prompts: int
    score_workers: int  # 0 = score inline
    diversity_on: Sequence[str]
    judge_cfg: JudgeConfig | None  # None = judge off
    cf_standings: dict | None
    show_progress: bool
    dtype: str  # auto | float32 | bfloat16
    devices: str  # auto | 1 | all
    decode_slots: int
    decode_chunk: int
    prefill_buckets: Sequence[int] | None  # None = powers of two up to the context
    overwrite: bool = False  # remove an earlier eval's files in `out` instead of resuming
    self_bleu: str = "add1"  # self-BLEU convention (eval/diversity.py SELF_BLEU_VARIANTS)
    sandbox_isolation: str = "required"  # code rewards: required | best_effort
    kv_cache: str = "paged"  # the engine's KV cache: paged | dense
    page_size: int = 64
    kv_cache_gib: float | None = None  # page pool budget (None: the engine's default)


def run_eval(problems: Sequence[Problem], backend: Backend, out: Path, *, n: int, seed: int,
             batch_prompts: int, scorer: Scorer, config: dict[str, Any],
             diversity_on: Sequence[str] = DIVERSITY_DEFAULT, data_dir: Path | None = None,
             judge_cfg: JudgeConfig | None = None, cf_standings: dict | None = None,
             show_progress: bool = False, self_bleu: str = "add1") -> dict[str, Any]:
    """The whole eval given problems and a backend (the CLI and tests both go through here)."""
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    t0 = time.time()
    new = generate_and_score(problems, backend, scorer, out / "samples.jsonl", n, seed,
                             batch_prompts, show_progress)
    samples = read_samples(out / "samples.jsonl")
    summary = summarize(problems, samples, diversity_on, data_dir, judge_cfg, cf_standings,
                        self_bleu_variant=self_bleu)
    write_outputs(out, summary, {"model": config.get("model"), "config": config,
                                 "new_samples": new, "wall_s": round(time.time() - t0, 3)})
    return summary


def build_problems(benchmarks: Sequence[str], data_dir: Path, limit: int | None,
                   render: Callable[[str], Any]) -> list[Problem]:
    """Problems of every benchmark from the data registry; `render` maps the user message to
    what the backend takes (chat-templated token ids for the real engine)."""
    out: list[Problem] = []
    for b in benchmarks:
        for rec in load_eval_set(b, data_dir, limit=limit):
            out.append(Problem(b, rec.id, render(apply_template(rec)), rec.ground_truth,
                               rec.data_source, rec.prompt))
    return out


def evaluate_model(s: EvalSettings) -> dict[str, Any]:
    """Load the model into the sampling engine, build the problems and run_eval; returns the
    summary. Bad input (model, data, prompt lengths, resume mismatch) raises EvalError."""
    dtype = resolve_dtype(s.dtype)
    try:
        ident = model_identity(s.model)
    except (OSError, ValueError) as e:  # not a model directory (CheckpointError), unreadable
        raise EvalError(f"--model {s.model}: {e}") from e
    config = {"model": str(Path(s.model).resolve()), "model_digest": ident["digest"],
              "model_step": ident.get("step"), "model_identity": ident,
              "n": s.n, "seed": s.seed,
              "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
              "max_new_tokens": s.max_new_tokens, "batch_prompts": s.batch_prompts,
              "dtype": dtype, "benchmarks": list(s.benchmarks), "limit": s.limit}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    if s.overwrite:
        clear_outputs(out, KNOWN)
    check_config(out, config)  # before the model loads: a mismatch costs nothing
    try:
        backend = EngineBackend(s.model, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, max_new_tokens=s.max_new_tokens, dtype=dtype,
                                decode_slots=s.decode_slots, decode_chunk=s.decode_chunk,
                                devices=s.devices, prefill_buckets=s.prefill_buckets,
                                kv_cache=s.kv_cache, page_size=s.page_size,
                                kv_cache_gib=s.kv_cache_gib)
        problems = build_problems(s.benchmarks, s.data_dir, s.limit, backend.encode)
        backend.check_lengths(problems)
    except (OSError, ValueError, KeyError) as e:  # unreadable model/tokenizer/data: one line
        raise EvalError(str(e)) from e
    sandbox = SandboxConfig(policy=s.sandbox_isolation)
    if any(runs_code(p.data_source) for p in problems):  # refuse before generating, not after
        isolation_mode(sandbox)
    scorer = (RewardPool(num_workers=s.score_workers, sandbox=sandbox) if s.score_workers > 0
              else Scorer(0, fn=sandboxed_score(sandbox)))
    try:
        return run_eval(problems, backend, out, n=s.n, seed=s.seed,
                        batch_prompts=s.batch_prompts, scorer=scorer, config=config,
                        diversity_on=s.diversity_on, data_dir=s.data_dir,
                        judge_cfg=s.judge_cfg, cf_standings=s.cf_standings,
                        show_progress=s.show_progress, self_bleu=s.self_bleu)
    finally:
        scorer.close()
