"""Training metrics: `OUT/metrics.jsonl` (one JSON object per rollout step), TensorBoard
(`OUT/tb/`, tensorboardX), Weights & Biases (optional, rl/metrics_wandb.py) and a live rich
progress bar with a compact table. `trainer.loggers` picks TensorBoard and W&B.

Only process 0 writes. On resume, the JSONL file is rewritten from the metric history stored
in the checkpoint and TensorBoard events after the restored step are purged, so a killed and
resumed run ends with exactly the records of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional

import numpy as np

from flowrl_jax.paths import as_path, is_url
from flowrl_jax.rl.metrics_wandb import WandbSink
from flowrl_jax.run_files import canonical_metrics

# What the live table shows (when present), in order: (metric key, column header).
DISPLAY = (
    ("reward/mean", "reward"), ("reward/accuracy", "acc"), ("response_length/mean", "len"),
    ("loss/total", "loss"), ("flowrl/log_z_mean", "logZ"), ("kl/ref", "kl_ref"),
    ("optimizer/grad_norm", "gnorm"),
    ("time/step", "s/step"), ("throughput/tokens_per_s", "tok/s"),
)


def to_jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain Python scalars (floats; NaN/inf kept as floats, written as JSON NaN/Infinity)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        else:
            a = np.asarray(v)
            out[k] = float(a) if a.size == 1 else [float(x) for x in a.reshape(-1)]
    return out


class MetricsLogger:
    """Append-only JSONL + TensorBoard + console, for one run directory."""

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True,
                 tensorboard: bool = True, console: bool = True, total_steps: int = 0,
                 history: Optional[Iterable[dict]] = None, start_step: int = 0,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None):
        """`wandb_project` set: also log to Weights & Biases (`run_config` as the run's config)."""
        self.enabled = enabled
        self.remote = is_url(out_dir)  # object stores cannot append: rewritten each step
        self.path = as_path(out_dir) / "metrics.jsonl"
        # a run resumed from before the naming convention continues under today's names
        self.history: list[dict] = [canonical_metrics(rec) for rec in history or []]
        self._tb = None
        self._wandb: Optional[WandbSink] = None
        self._progress = None
        self._task = None
        self._rows = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite from the checkpointed history: lines a killed run wrote after its last
        # checkpoint must not survive (the resumed run writes them again).
        self._rewrite()
        if tensorboard:
            try:
                # local: TensorBoard is optional (a failed import must not stop training)
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(f"{out_dir}/tb", purge_step=start_step + 1)
            except Exception:  # noqa: BLE001 - TensorBoard is optional; JSONL is the record
                self._tb = None
        if wandb_project is not None:
            self._wandb = WandbSink(as_path(out_dir), wandb_project, run_config, start_step)
        if console:
            self._start_console(total_steps, start_step)

    def _rewrite(self) -> None:
        """Write the whole history (atomically for local files)."""
        text = "".join(json.dumps(rec) + "\n" for rec in self.history)
        if self.remote:
            self.path.write_text(text)
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def _start_console(self, total: int, done: int) -> None:
        # local: only runs with a live console pay for importing rich
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._console = Console(stderr=True)
        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[info]}"), console=self._console,
                                  transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, info="")

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Record one rollout step's metrics (everywhere) and return the JSON record."""
        rec = {"step": int(step), **to_jsonable(metrics)}
        self.history.append(rec)
        if not self.enabled:
            return rec
        if self.remote:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, rec)
        if self._progress is not None:
            info = "  ".join(f"{h} {rec[k]:.4g}" for k, h in DISPLAY[:4]
                             if isinstance(rec.get(k), float))
            self._progress.update(self._task, completed=step, info=info)
        return rec

    def table(self, rec: dict) -> None:
        """Print one compact fixed-width row of the headline metrics (header every 20 rows)."""
        if not self.enabled or self._progress is None:
            return
        cols = [(k, h) for k, h in DISPLAY if isinstance(rec.get(k), float)]
        if [k for k, _ in cols] != getattr(self, "_cols", None) or self._rows % 20 == 0:
            self._cols = [k for k, _ in cols]
            self._progress.console.print(
                "[bold]" + f"{'step':>6}" + "".join(f"{h:>10}" for _, h in cols) + "[/bold]",
                soft_wrap=True)
        self._rows = getattr(self, "_rows", 0) + 1
        self._progress.console.print(f"{rec['step']:>6}" +
                                     "".join(f"{rec[k]:>10.4g}" for k, _ in cols),
                                     soft_wrap=True)

    def print(self, msg: str) -> None:
        """A log line that does not break the progress bar."""
        if self.enabled and self._progress is not None:
            self._progress.console.print(msg)
        elif self.enabled:
            print(msg, flush=True)

    def close(self) -> None:
        """Flush and close TensorBoard and W&B and stop the live display."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
