"""`flowrl-jax eval`: sample n responses per problem, score them, write Avg@n / pass@k tables.

Output directory (``--out``):

* ``samples.jsonl``: one line per scored sample (benchmark, prompt_id, sample_index, text,
  num_tokens, score, finish_reason, data_source), appended as scores arrive. A rerun with
  the same ``--out`` skips every (benchmark, prompt_id, sample_index) already there.
* ``eval_config.json``: the settings that change samples (model, n, sampling, seed…);
  a rerun with different settings is refused instead of mixing samples.
* ``summary.json``: per-benchmark summaries, the six-benchmark math average, diversity,
  Codeforces extras and (optional) LLM-judge scores; ``results.md`` and ``<bench>.md``:
  the Markdown tables.

Determinism across resume: problems are cut into fixed chunks (``--batch-prompts`` problems
per chunk, in data order) and chunk c of benchmark b is sampled with a seed derived from
(seed, b, c). A resumed run regenerates only chunks with missing samples and keeps only
the missing ones, so with a deterministic sampler it reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

SUITES: dict[str, tuple[str, ...]] = {
    "math": ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"),
    "code": ("livecodebench", "humanevalplus", "codeforces"),
}
SUITES["all"] = SUITES["math"] + SUITES["code"]
KNOWN = SUITES["all"] + ("gsm8k",)
DIVERSITY_DEFAULT = ("aime24", "aime25")
SAMPLE_KEYS = ("benchmark", "prompt_id", "sample_index", "text", "num_tokens", "score",
               "finish_reason", "data_source")


class EvalError(RuntimeError):
    """Bad eval input (paths, settings, resume mismatch); the message names the culprit."""


# ----------------------------------------------------------------------------- plumbing types

@dataclass(frozen=True)
class Problem:
    """One evaluation problem, ready for the backend."""

    benchmark: str
    prompt_id: str
    prompt: Any  # whatever the backend takes: token ids or rendered text
    ground_truth: Any
    data_source: str
    problem_text: str = ""


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    prompt_index: int
    sample_index: int
    text: str
    num_tokens: int
    finish_reason: str


class Backend(Protocol):
    """Generates n responses for each prompt of a batch with a given seed."""

    def generate(self, prompts: Sequence[Any], n: int, seed: int) -> list[Generation]:
        """Return len(prompts)·n generations (any order)."""
        ...


# ----------------------------------------------------------------------------- arguments

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `flowrl-jax eval` arguments (fixed interface: extend, never rename)."""
    parser.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint")
    parser.add_argument("--suite", default="math",
                        help="math | code | all | NAME[,NAME...] (known: " + ", ".join(KNOWN) + ")")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--limit", type=int, default=None, help="first K problems per benchmark")
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--data-dir", default=None,
                        help="data root (default: $FLOWRL_DATA_DIR, else ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-prompts", type=int, default=64,
                        help="problems per generation call (each sampled n times)")
    parser.add_argument("--score-workers", type=int, default=max(1, min(16, (os.cpu_count() or 2))),
                        help="reward worker threads (code runs sandboxed, Math-Verify in worker "
                             "processes); 0 = score inline")
    parser.add_argument("--diversity", default=",".join(DIVERSITY_DEFAULT),
                        help="benchmarks to compute diversity metrics on: NAME[,NAME] | all | none")
    parser.add_argument("--judge", action="store_true",
                        help="also ask the LLM judge (FLOWRL_JUDGE_URL etc.) for diversity scores")
    parser.add_argument("--cf-standings", default=None,
                        help="JSON file of cached Codeforces standings for the CodeElo rating: "
                             '{contest_id: {"problems": [{"index", "points"?}], "rows": '
                             '[{"points", "penalty"}], "old_ratings": [...]}} (rated users only)')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute/KV-cache dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--devices", default="auto", choices=("auto", "1", "all"),
                        help="devices to shard the model over (auto: all on GPU/TPU, 1 on CPU)")
    parser.add_argument("--decode-slots", type=int, default=256, help="continuous-batching slots")
    parser.add_argument("--decode-chunk", type=int, default=64, help="decode steps per device loop")
    parser.add_argument("--prefill-buckets", default=None,
                        help="comma-separated prompt-length buckets (fewer buckets = fewer "
                             "compilations; default powers of two from 128 to the model's context)")


def _mesh(devices: str) -> Any:
    """1-device mesh, or all devices on the fsdp axis (auto: all on GPU/TPU, 1 on CPU)."""
    import jax

    from flowrl_jax.mesh import make_mesh, single_device_mesh

    if devices == "auto":
        devices = "1" if jax.default_backend() == "cpu" else "all"
    return make_mesh() if devices == "all" else single_device_mesh()


def _buckets(spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    try:
        out = tuple(sorted(int(x) for x in spec.split(",") if x.strip()))
    except ValueError as e:
        raise EvalError(f"--prefill-buckets {spec!r}: expected comma-separated integers") from e
    if not out or out[0] < 1:
        raise EvalError(f"--prefill-buckets {spec!r}: buckets must be positive")
    return out


def _dtype(name: str) -> str:
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def parse_suite(suite: str) -> list[str]:
    """Expand math|code|all|NAME[,NAME...] into benchmark names; unknown names raise."""
    names: list[str] = []
    for part in (p.strip() for p in suite.split(",")):
        if not part:
            continue
        for b in SUITES.get(part, (part,)):
            if b not in KNOWN:
                raise EvalError(f"--suite: unknown benchmark {b!r} (known: {', '.join(KNOWN)}; "
                                f"suites: math, code, all)")
            if b not in names:
                names.append(b)
    if not names:
        raise EvalError("--suite is empty")
    return names


def resolve_data_dir(arg: str | None) -> Path:
    """--data-dir, else $FLOWRL_DATA_DIR, else ../shared/data next to the repo or the cwd."""
    tried: list[Path] = []
    if arg:
        cands = [Path(arg)]
    elif os.environ.get("FLOWRL_DATA_DIR"):
        cands = [Path(os.environ["FLOWRL_DATA_DIR"])]
    else:
        repo = Path(__file__).resolve().parents[2]
        cands = [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in cands:
        tried.append(c)
        if c.is_dir():
            return c
    raise EvalError("evaluation data not found; tried " + ", ".join(str(t) for t in tried) +
                    " (pass --data-dir or set FLOWRL_DATA_DIR)")


# ----------------------------------------------------------------------------- resume files

def read_samples(path: Path) -> list[dict[str, Any]]:
    """Finished samples; a torn last line (killed writer) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:  # drop the partial record so appends start clean
            f.truncate(cut)
        raw = raw[:cut]
    out = []
    for ln, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{ln}: corrupt sample line ({e.msg}); delete it to resume")
        missing = [k for k in ("benchmark", "prompt_id", "sample_index", "score") if k not in rec]
        if missing:
            raise EvalError(f"{path}:{ln}: sample record lacks {missing}")
        out.append(rec)
    return out


def check_config(out: Path, cfg: dict[str, Any]) -> None:
    """Write eval_config.json, or refuse a resume whose sample-changing settings differ."""
    path = out / "eval_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        if diff:
            raise EvalError(f"{path}: settings differ from this run in {diff} "
                            f"(old {[old.get(k) for k in diff]}, new {[cfg.get(k) for k in diff]}); "
                            f"use another --out")
    else:
        path.write_text(json.dumps(cfg, indent=1, sort_keys=True))


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """Seed of one chunk: independent of which other chunks/benchmarks run (resume-stable)."""
    h = hashlib.sha256(f"{seed}/{benchmark}/{chunk}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- scoring

def _score_one(data_source: str, text: str, ground_truth: Any) -> float:
    from flowrl_jax.rewards import score

    return float(score(data_source, text, ground_truth))


class Scorer:
    """Scores responses in worker processes (or inline), overlapping generation."""

    def __init__(self, workers: int, fn: Callable[[str, str, Any], float] = _score_one):
        import multiprocessing as mp

        self.fn = fn
        # spawn, not fork: forking a process that already runs JAX threads can deadlock.
        self.pool = (cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
                     if workers > 0 else None)

    def submit(self, data_source: str, text: str, ground_truth: Any) -> cf.Future:
        """Future of the score."""
        if self.pool is not None:
            return self.pool.submit(self.fn, data_source, text, ground_truth)
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(self.fn(data_source, text, ground_truth))
        except Exception as e:  # noqa: BLE001 - surfaced when the result is read
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        """Shut the pool down."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- main loop

def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    transient=False)
    prog.start()
    prog.add_task("samples", total=total)
    return prog


def generate_and_score(problems: Sequence[Problem], backend: Backend, scorer: Scorer,
                       samples_path: Path, n: int, seed: int, batch_prompts: int,
                       show_progress: bool = False) -> int:
    """Generate/score every missing sample, appending records to samples_path; returns count."""
    done = {(r["benchmark"], str(r["prompt_id"]), int(r["sample_index"]))
            for r in read_samples(samples_path)}
    by_bench: dict[str, list[Problem]] = {}
    for p in problems:
        by_bench.setdefault(p.benchmark, []).append(p)
    work = []  # (benchmark, chunk index, problems)
    for b, probs in by_bench.items():
        for c in range(0, len(probs), batch_prompts):
            chunk = probs[c:c + batch_prompts]
            if any((b, p.prompt_id, i) not in done for p in chunk for i in range(n)):
                work.append((b, c // batch_prompts, chunk))
    total = sum(1 for _, _, ch in work for p in ch for i in range(n)
                if (p.benchmark, p.prompt_id, i) not in done)
    prog = _progress(total, show_progress and total > 0)
    lock = threading.Condition()
    outstanding = 0  # scores whose callback has not finished yet
    errors: list[str] = []
    written = 0

    def on_scored(rec: dict[str, Any], fut: cf.Future) -> None:
        # Runs in the scoring thread as soon as a score exists: the sample is on disk
        # before the next generate call returns, so a kill loses as little as possible.
        nonlocal written, outstanding
        try:
            rec["score"] = float(fut.result())
        except Exception as e:  # noqa: BLE001 - reported below, naming the sample
            with lock:
                errors.append(f"scoring {rec['benchmark']} {rec['prompt_id']} sample "
                              f"{rec['sample_index']} (data_source {rec['data_source']!r}) "
                              f"failed: {e}")
                outstanding -= 1
                lock.notify_all()
            return
        with lock:
            if not f.closed:  # an interrupted run has closed the file: drop late scores
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                written += 1
            outstanding -= 1
            lock.notify_all()
        if prog is not None:
            prog.advance(prog.task_ids[0])

    def check() -> None:
        with lock:
            if errors:
                raise EvalError(errors[0] + (f" (and {len(errors) - 1} more)"
                                             if len(errors) > 1 else ""))

    f = open(samples_path, "a", encoding="utf-8")
    try:
        for b, c, chunk in work:
            check()
            gens = backend.generate([p.prompt for p in chunk], n, chunk_seed(seed, b, c))
            for g in gens:
                p = chunk[g.prompt_index]
                if (b, p.prompt_id, g.sample_index) in done:
                    continue  # finished before an interruption: never recomputed
                rec = {"benchmark": b, "prompt_id": p.prompt_id,
                       "sample_index": g.sample_index, "text": g.text,
                       "num_tokens": g.num_tokens, "finish_reason": g.finish_reason,
                       "data_source": p.data_source}
                fut = scorer.submit(p.data_source, g.text, p.ground_truth)
                with lock:  # before add_done_callback, which may run the callback at once
                    outstanding += 1
                # scoring of this chunk overlaps the next generate call
                fut.add_done_callback(functools.partial(on_scored, rec))
        with lock:  # callbacks (not just futures) must finish before the file is read
            lock.wait_for(lambda: outstanding == 0)
        check()
    finally:
        with lock:  # closed under the lock: a late callback never writes half a line
            f.close()
        if prog is not None:
            prog.stop()
    return written


def summarize(problems: Sequence[Problem], samples: Sequence[dict[str, Any]],
              diversity_on: Sequence[str], data_dir: Path | None,
              judge_cfg: Any = None, cf_standings: dict | None = None) -> dict[str, Any]:
    """summary.json content from the scored samples of the requested problems."""
    from flowrl_jax import diversity as dv
    from flowrl_jax import evaluate as ev

    wanted = {(p.benchmark, p.prompt_id) for p in problems}
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        if (s["benchmark"], str(s["prompt_id"])) in wanted:
            by_bench.setdefault(s["benchmark"], []).append(s)
    order = list(dict.fromkeys(p.benchmark for p in problems))
    benches = {b: ev.summarize_benchmark(b, by_bench[b]) for b in order if b in by_bench}
    out: dict[str, Any] = {"benchmarks": benches, "math_average": ev.math_average(benches)}
    div = {b: dv.benchmark_diversity(by_bench[b]) for b in order
           if b in by_bench and b in diversity_on}
    if div:
        out["diversity"] = {b: {"mean": d["mean"]} for b, d in div.items()}
        out["diversity_per_problem"] = {b: d["per_problem"] for b, d in div.items()}
    if "codeforces" in by_bench and data_dir is not None:
        out["codeforces"] = _codeforces(by_bench["codeforces"], data_dir, cf_standings)
    if judge_cfg is not None and div:
        from flowrl_jax import judge as jg

        texts = {p.prompt_id: p.problem_text for p in problems}
        res = {}
        for b in div:
            groups = ev.group_by_problem(by_bench[b])
            res[b] = jg.judge_benchmark(judge_cfg, texts,
                                        {pid: [s["text"] for s in g] for pid, g in groups.items()})
        out["judge"] = {"enabled": True, "per_benchmark": res,
                        "mean_score": _mean([r["mean_score"] for r in res.values()]),
                        "num_scored": sum(r["num_scored"] for r in res.values()),
                        "num_failed": sum(r["num_failed"] for r in res.values())}
    return out


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _codeforces(samples: Sequence[dict[str, Any]], data_dir: Path,
                standings: dict | None) -> dict[str, Any]:
    """Codeforces extras: prompt ids map to metadata_cf.json ids by position when numeric."""
    from flowrl_jax import evaluate as ev

    cf_dir = data_dir / "codeforces"
    try:
        meta = json.loads((cf_dir / "metadata_cf.json").read_text())
        ratings = json.loads((cf_dir / "ratings_2024.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"{cf_dir}: cannot read metadata_cf.json/ratings_2024.json ({e})",
                "note": ev.CODEELO_NOT_DONE}
    groups = ev.group_by_problem(samples)
    attempts: dict[str, list[bool]] = {}
    for pid, g in groups.items():
        cf_id = _cf_id(pid, meta)
        if cf_id is not None:
            attempts[cf_id] = [ev.is_correct(s["score"]) for s in g]
    return ev.codeforces_summary(attempts, meta, ratings, standings)


def _cf_id(prompt_id: str, meta: Sequence[str]) -> str | None:
    if prompt_id in meta:
        return prompt_id
    tail = prompt_id.rsplit("-", 1)[-1].rsplit("/", 1)[-1]
    if tail.isdigit() and int(tail) < len(meta):
        return meta[int(tail)]
    return None


def write_outputs(out: Path, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """summary.json, results.md and one <bench>.md per benchmark."""
    from flowrl_jax import evaluate as ev

    summary = {**meta, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    benches = summary["benchmarks"]
    extra = {"codeforces": summary.get("codeforces")} if summary.get("codeforces", {}).get(
        "num_problems") is not None else None
    md = [f"# Evaluation of `{meta.get('model')}`", "", ev.render_markdown(benches, extra)]
    if "diversity" in summary:
        md += ["## Diversity (judge-free, mean over problems)", ""]
        keys = ["distinct_1", "distinct_2", "distinct_3", "self_bleu", "self_bleu_300",
                "distinct_answers", "distinct_correct_paths"]
        md += ["| benchmark | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for b, d in summary["diversity"].items():
            md.append(f"| {b} | " + " | ".join(
                "–" if d["mean"].get(k) is None else f"{d['mean'][k]:.3f}" for k in keys) + " |")
        md.append("")
    if summary.get("judge"):
        md.append(f"LLM-judge diversity (1–5): {summary['judge'].get('mean_score')}")
    (out / "results.md").write_text("\n".join(md) + "\n")
    for b, s in benches.items():
        (out / f"{b}.md").write_text(ev.render_markdown({b: s}))


def run_eval(problems: Sequence[Problem], backend: Backend, out: Path, *, n: int, seed: int,
             batch_prompts: int, scorer: Scorer, config: dict[str, Any],
             diversity_on: Sequence[str] = DIVERSITY_DEFAULT, data_dir: Path | None = None,
             judge_cfg: Any = None, cf_standings: dict | None = None,
             show_progress: bool = False) -> dict[str, Any]:
    """The whole eval given problems and a backend (the CLI and tests both go through here)."""
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    t0 = time.time()
    new = generate_and_score(problems, backend, scorer, out / "samples.jsonl", n, seed,
                             batch_prompts, show_progress)
    samples = read_samples(out / "samples.jsonl")
    summary = summarize(problems, samples, diversity_on, data_dir, judge_cfg, cf_standings)
    write_outputs(out, summary, {"model": config.get("model"), "config": config,
                                 "new_samples": new, "wall_s": round(time.time() - t0, 3)})
    return summary


def build_problems(benchmarks: Sequence[str], data_dir: Path, limit: int | None,
                   render: Callable[[str], Any]) -> list[Problem]:
    """Problems of every benchmark from the data registry; `render` maps the user message to
    what the backend takes (chat-templated token ids for the real engine)."""
    from flowrl_jax.data.registry import load_eval_set
    from flowrl_jax.data.templates import apply_template

    out: list[Problem] = []
    for b in benchmarks:
        for rec in load_eval_set(b, data_dir, limit=limit):
            out.append(Problem(b, rec.id, render(apply_template(rec)), rec.ground_truth,
                               rec.data_source, rec.prompt))
    return out


class EngineBackend:
    """The JAX sampling engine behind the Backend protocol (token ids in, decoded text out)."""

    def __init__(self, model_dir: str, *, temperature: float, top_p: float, top_k: int,
                 max_new_tokens: int, dtype: str = "float32", decode_slots: int = 256,
                 decode_chunk: int = 64, devices: str = "auto",
                 prefill_buckets: Sequence[int] | None = None):
        from flowrl_jax.config import ModelConfig
        from flowrl_jax.data.templates import ChatRenderer
        from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams
        from flowrl_jax.checkpoint.load import load_for_sampling
        from flowrl_jax.data.tokenizer import load_tokenizer_for

        self.mesh = _mesh(devices)
        self.model, self.arch, tok_dir = load_for_sampling(
            model_dir, self.mesh, ModelConfig(path=model_dir, compute_dtype=dtype))
        self.tokenizer = load_tokenizer_for(tok_dir)
        self.tokenizer_dir = tok_dir
        self.render = ChatRenderer(self.tokenizer)
        # Stop at the model's EOS, the tokenizer's EOS and Qwen's chat end-of-turn token.
        eos = {t for t in (self.arch.eos_token_id, self.tokenizer.eos_token_id) if t is not None}
        unk = self.tokenizer.unk_token_id
        for name in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != unk and 0 <= tid < self.arch.vocab_size:
                eos.add(tid)
        buckets = tuple(prefill_buckets or (
            b for b in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
            if b <= self.arch.max_position_embeddings)) or (128,)
        self.engine = SamplingEngine(self.model, mesh=self.mesh, decode_slots=decode_slots,
                                     decode_chunk=decode_chunk, prefill_buckets=buckets,
                                     eos_token_ids=sorted(eos),
                                     pad_token_id=self.tokenizer.pad_token_id or 0, verbose=False)
        self._params_cls = SamplingParams
        self.max_new_tokens = max_new_tokens
        self.settings = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=max_new_tokens)

    def encode(self, user_message: str) -> list[int]:
        """Chat-templated prompt token ids."""
        return self.tokenizer.encode(self.render(user_message), add_special_tokens=False)

    def check_lengths(self, problems: Sequence[Problem]) -> None:
        """Refuse prompts that cannot fit the model's context up front, naming them."""
        limit = self.arch.max_position_embeddings
        bad = [f"{p.prompt_id} ({len(p.prompt)} tokens)" for p in problems
               if len(p.prompt) + self.max_new_tokens > limit]
        if bad:
            raise EvalError(f"{len(bad)} prompt(s) + --max-new-tokens {self.max_new_tokens} exceed "
                            f"the model's max_position_embeddings {limit}: {', '.join(bad[:5])}"
                            f"{' …' if len(bad) > 5 else ''}; lower --max-new-tokens")

    def generate(self, prompts: Sequence[Any], n: int, seed: int) -> list[Generation]:
        """Sample n responses per prompt in one engine call."""
        sp = self._params_cls(n=n, seed=seed, **self.settings)
        ro = self.engine.generate(self.model, [list(p) for p in prompts], sp)
        out = []
        for r in range(len(ro.lengths)):
            ids = ro.tokens[r, :int(ro.lengths[r])].tolist()
            out.append(Generation(int(ro.prompt_index[r]), int(ro.sample_index[r]),
                                  self.tokenizer.decode(ids, skip_special_tokens=True),
                                  int(ro.lengths[r]), str(ro.finish_reasons[r])))
        return out


def run(args: argparse.Namespace) -> int:
    """CLI entry: build problems and the sampling backend, then run_eval."""
    try:
        benchmarks = parse_suite(args.suite)
        for flag, v in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-prompts", args.batch_prompts)):
            if v < 1:
                raise EvalError(f"{flag} must be >= 1, got {v}")
        if args.limit is not None and args.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {args.limit}")
        data_dir = resolve_data_dir(args.data_dir)
        if not Path(args.model).exists():
            raise EvalError(f"--model {args.model}: no such directory")
        div = (list(KNOWN) if args.diversity == "all" else [] if args.diversity == "none"
               else [d.strip() for d in args.diversity.split(",") if d.strip()])
        unknown = [d for d in div if d not in KNOWN]
        if unknown:
            raise EvalError(f"--diversity: unknown benchmark(s) {unknown} (known: "
                            f"{', '.join(KNOWN)}, or all / none)")
        judge_cfg = None
        if args.judge:
            from flowrl_jax import judge as jg

            judge_cfg = jg.config_from_env()
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
    except EvalError as e:
        print(f"flowrl-jax eval: {e}", file=sys.stderr)
        return 2
    from flowrl_jax.rewards import RewardPool

    try:
        backend = EngineBackend(args.model, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                dtype=_dtype(args.dtype), decode_slots=args.decode_slots,
                                decode_chunk=args.decode_chunk, devices=args.devices,
                                prefill_buckets=_buckets(args.prefill_buckets))
        problems = build_problems(benchmarks, data_dir, args.limit, backend.encode)
        backend.check_lengths(problems)
    except (OSError, ValueError, KeyError, EvalError) as e:
        print(f"flowrl-jax eval: {e}", file=sys.stderr)
        return 2
    config = {"model": str(Path(args.model).resolve()), "n": args.n, "seed": args.seed,
              "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
              "max_new_tokens": args.max_new_tokens, "batch_prompts": args.batch_prompts,
              "dtype": _dtype(args.dtype)}
    scorer = (RewardPool(num_workers=args.score_workers) if args.score_workers > 0
              else Scorer(0))
    try:
        summary = run_eval(problems, backend, Path(args.out), n=args.n, seed=args.seed,
                           batch_prompts=args.batch_prompts, scorer=scorer, config=config,
                           diversity_on=div, data_dir=data_dir, judge_cfg=judge_cfg,
                           cf_standings=standings, show_progress=not args.no_progress)
    except EvalError as e:
        print(f"flowrl-jax eval: {e}", file=sys.stderr)
        return 2
    finally:
        scorer.close()
    print((Path(args.out) / "results.md").read_text())
    avg = summary["math_average"]
    if avg["value"] is not None:
        print(f"math average (6): {100 * avg['value']:.2f}")
    return 0
