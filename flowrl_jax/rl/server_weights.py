"""The weight push to remote rollout servers (`rollout.servers`): the trainer writes its policy
as a HF directory (checkpoint/hf.py's export, the one writer of policy weights) to
`OUT/rollout_weights/v<version>` on storage the servers share, and each server loads it
(sampling/remote_rollouts.py, `LoadWeights`). Servers that already hold the version are
skipped; older versions are removed once every live server has the new one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

from flowrl_jax.checkpoint.hf import export_hf
from flowrl_jax.config import ModelArch
from flowrl_jax.sampling.remote_rollouts import RemoteRollouts

WEIGHTS_DIR = "rollout_weights"


class ServerWeights:
    """`seconds = push(policy, version)`: the servers serve `policy` as `version` afterwards."""

    def __init__(self, remote: RemoteRollouts, out_dir: Path, arch: ModelArch,
                 tokenizer_dir: Optional[str] = None):
        self.remote, self.arch, self.tokenizer_dir = remote, arch, tokenizer_dir
        self.root = Path(out_dir) / WEIGHTS_DIR

    def __call__(self, policy: Any, version: int) -> float:
        if self.remote.has(version):
            return 0.0
        t0 = time.perf_counter()
        target = self.root / f"v{int(version)}"
        export_hf(policy, self.arch, target, tokenizer_dir=self.tokenizer_dir)
        self.remote.load_weights(str(target.resolve()), version)
        for old in self.root.glob("v*"):  # every live server now holds `target`
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
        return time.perf_counter() - t0
