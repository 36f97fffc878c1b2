"""Weights & Biases sink for the training metrics (`trainer.loggers: [..., wandb]`).

Optional: the `wandb` extra. The standard environment variables apply (`WANDB_MODE=offline`
writes the run under `WANDB_DIR`, else OUT, for a later `wandb sync`; `WANDB_API_KEY`,
`WANDB_ENTITY`). The run's id is kept in `OUT/wandb_run_id`, so a resumed training run
continues the same W&B run; steps it already logged are not sent twice.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any, Optional

ID_FILE = "wandb_run_id"


class WandbSink:
    """One W&B run per training run directory; logs finite scalar metrics by rollout step."""

    def __init__(self, out_dir: Any, project: str, config: Optional[dict[str, Any]],
                 start_step: int = 0):
        # local: wandb is an optional extra (checked at config load) and slow to import
        import wandb

        id_file = out_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._last_step = start_step
        local = out_dir if isinstance(out_dir, Path) else None  # an object store: wandb's default
        self.run = wandb.init(project=project, name=out_dir.name, id=run_id, resume="allow",
                              config=config or {},
                              dir=os.environ.get("WANDB_DIR", str(local) if local else None))

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Send one rollout step's scalars (a step a resumed run already sent is skipped)."""
        if step <= self._last_step:
            return
        self._last_step = step
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        self.run.log(scalars, step=step)

    def close(self) -> None:
        """Finish the run (offline: its files are complete on disk)."""
        self.run.finish()
