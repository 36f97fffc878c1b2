"""The generation + scoring loop: every missing sample is generated chunk by chunk, scored
while the next chunk generates, and appended to ``samples.jsonl`` as soon as its score exists."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import threading
from pathlib import Path
from typing import Any, Sequence

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from flowrl_jax.eval.records import Backend, EvalError, Problem
from flowrl_jax.eval.resume import chunk_seed, read_samples
from flowrl_jax.eval.scoring import Scorer, extracted_answer, gold_answer


def _progress(total: int, enabled: bool) -> Progress | None:
    """A started progress bar over `total` samples, or None when disabled."""
    if not enabled:
        return None
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
                       "data_source": p.data_source, "gold": gold_answer(p.ground_truth),
                       "extracted": extracted_answer(g.text, p.ground_truth)}
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
