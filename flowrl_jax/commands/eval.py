"""`flowrl-jax eval`: check the arguments, then flowrl_jax.eval.runner.evaluate_model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flowrl_jax.commands.common_args import (add_device_arguments, add_kv_cache_arguments,
                                             add_sampling_arguments)
from flowrl_jax.eval.judge import config_from_env
from flowrl_jax.eval.records import EvalError
from flowrl_jax.eval.suites import DIVERSITY_DEFAULT, KNOWN, parse_diversity, parse_suite

if TYPE_CHECKING:
    from flowrl_jax.eval.runner import EvalSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `flowrl-jax eval` arguments (fixed interface: extend, never rename)."""
    parser.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint")
    parser.add_argument("--suite", default="math",
                        help="math | code | all | NAME[,NAME...] (known: " + ", ".join(KNOWN) + ")")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    add_sampling_arguments(parser, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=8192)
    parser.add_argument("--limit", type=int, default=None, help="first K problems per benchmark")
    parser.add_argument("--out", required=True,
                        help="output directory (resumable onto the same model and settings)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start --out afresh (remove an earlier eval's samples and tables) "
                             "instead of resuming; needed when the model or settings changed")
    parser.add_argument("--data-dir", default=None,
                        help="data root (default: $FLOWRL_DATA_DIR, else the packaged copy)")
    add_sampling_arguments(parser, seed=0)
    parser.add_argument("--batch-prompts", type=int, default=64,
                        help="problems per generation call (each sampled n times)")
    parser.add_argument("--score-workers", type=int, default=max(1, min(16, (os.cpu_count() or 2))),
                        help="reward worker threads (code runs sandboxed, Math-Verify in worker "
                             "processes); 0 = score inline")
    parser.add_argument("--sandbox-isolation", default="required", choices=("required", "best_effort"),
                        help="code rewards: required = refuse to run programs when no isolating "
                             "sandbox backend works here (default); best_effort = run them "
                             "unisolated then (rlimits only), with a warning")
    parser.add_argument("--diversity", default=",".join(DIVERSITY_DEFAULT),
                        help="benchmarks to compute diversity metrics on: NAME[,NAME] | all | none")
    parser.add_argument("--self-bleu", default="add1", choices=("add1", "texygen"),
                        help="self-BLEU convention: add1 = BLEU-4 with add-one smoothing (default); "
                             "texygen = BLEU-3 with NLTK smoothing method1, as in Texygen and the "
                             "papers that use it")
    parser.add_argument("--judge", action="store_true",
                        help="also ask the LLM judge (FLOWRL_JUDGE_URL etc.) for diversity scores")
    parser.add_argument("--cf-standings", default=None,
                        help="JSON file of cached Codeforces standings for the CodeElo rating: "
                             '{contest_id: {"problems": [{"index", "points"?}], "rows": '
                             '[{"points", "penalty"}], "old_ratings": [...]}} (rated users only)')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arguments(parser)
    add_kv_cache_arguments(parser)
    add_sampling_arguments(parser, decode_slots=256, decode_chunk=64)
    parser.add_argument("--prefill-buckets", default=None,
                        help="comma-separated prompt-length buckets (fewer buckets = fewer "
                             "compilations; default powers of two from 128 to the model's context)")


def parse_buckets(spec: str | None) -> tuple[int, ...] | None:
    """--prefill-buckets "128,512" → (128, 512); None when not given."""
    if not spec:
        return None
    try:
        out = tuple(sorted(int(x) for x in spec.split(",") if x.strip()))
    except ValueError as e:
        raise EvalError(f"--prefill-buckets {spec!r}: expected comma-separated integers") from e
    if not out or out[0] < 1:
        raise EvalError(f"--prefill-buckets {spec!r}: buckets must be positive")
    return out


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """Check the arguments (errors name the flag) and gather them into EvalSettings."""
    # data/ and the runner load JAX and Grain: imported only when eval runs, so that
    # `flowrl-jax --help` stays quick.
    from flowrl_jax.data.registry import resolve_data_dir
    from flowrl_jax.eval.runner import EvalSettings

    benchmarks = parse_suite(args.suite)
    for flag, v in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens),
                    ("--batch-prompts", args.batch_prompts)):
        if v < 1:
            raise EvalError(f"{flag} must be >= 1, got {v}")
    # the engine would refuse these only after --out was set up: refuse them first
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise EvalError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    data_dir = resolve_data_dir(args.data_dir)
    if not Path(args.model).exists():
        raise EvalError(f"--model {args.model}: no such directory")
    diversity_on = parse_diversity(args.diversity)
    judge_cfg = None
    if args.judge:
        judge_cfg = config_from_env()
        if judge_cfg is None:
            raise EvalError("--judge needs FLOWRL_JUDGE_URL (and usually FLOWRL_JUDGE_API_KEY, "
                            "FLOWRL_JUDGE_MODEL) in the environment")
    standings = None
    if args.cf_standings:
        try:
            standings = {int(k): v for k, v in
                         json.loads(Path(args.cf_standings).read_text()).items()}
        except (OSError, ValueError) as e:
            raise EvalError(f"--cf-standings {args.cf_standings}: {e}") from e
    return EvalSettings(
        model=args.model, out=Path(args.out), benchmarks=benchmarks, data_dir=data_dir,
        n=args.n, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, limit=args.limit,
        batch_prompts=args.batch_prompts, score_workers=args.score_workers,
        diversity_on=diversity_on, judge_cfg=judge_cfg, cf_standings=standings,
        show_progress=not args.no_progress, dtype=args.dtype, devices=args.devices,
        decode_slots=args.decode_slots, decode_chunk=args.decode_chunk,
        prefill_buckets=parse_buckets(args.prefill_buckets), overwrite=args.overwrite,
        kv_cache=args.kv_cache, page_size=args.page_size, kv_cache_gib=args.kv_cache_gib,
        self_bleu=args.self_bleu, sandbox_isolation=args.sandbox_isolation)


def run(args: argparse.Namespace) -> int:
    """Evaluate, then print results.md and the math average; 2 on bad input."""
    from flowrl_jax.data.records import DataError  # with JAX, as in settings_from_args
    from flowrl_jax.eval.runner import evaluate_model

    try:
        summary = evaluate_model(settings_from_args(args))
    except (EvalError, DataError) as e:
        print(f"flowrl-jax eval: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    avg = summary["math_average"]
    if avg["value"] is not None:
        print(f"math average (6): {100 * avg['value']:.2f}")
    return 0
