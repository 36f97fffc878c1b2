"""A tiny synthetic task for the trainer tests: token-id prompts, reward from token ids.

No tokenizer or data files: prompts are random ids drawn from (seed, step, process), and
the reward of a response is +1 when its first token equals a target derived from the
prompt, else -1 (a ±1 outcome reward like the DAPO math reward).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flowrl_jax.rl.task import PromptBatch

VOCAB = 128


class ToySource:
    """Deterministic prompt batches; the state is the number of batches drawn."""

    def __init__(self, seed: int, n: int, process_index: int):
        self.seed, self.n, self.pi = seed, n, process_index  # n prompts on this process
        self.k = 0

    def __iter__(self) -> "ToySource":
        return self

    def __next__(self) -> PromptBatch:
        # The global batch depends on (seed, step) only; a process takes its contiguous slice,
        # so the trainer's process-order gather rebuilds the single-process batch exactly.
        rng = np.random.default_rng([self.seed, self.k])
        self.k += 1
        n_global = self.n * (self.pi + 1)
        prompts = [rng.integers(3, VOCAB, size=int(rng.integers(3, 7))).tolist()
                   for _ in range(n_global)][self.pi * self.n:]
        return PromptBatch(prompts, [p[0] % 16 + 3 for p in prompts], ["toy"] * self.n)

    def get_state(self) -> dict:
        return {"k": self.k}

    def set_state(self, state: dict) -> None:
        self.k = int(state["k"])


class ToyTask:
    """Reward +1 iff the first response token equals the prompt's target id."""

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def prompt_source(self, cfg: Any, process_index: int, process_count: int) -> ToySource:
        return ToySource(cfg.seed, cfg.rollout.prompts_per_step // process_count, process_index)

    def score(self, batch: PromptBatch, prompt_index: np.ndarray,
              responses: Sequence[Sequence[int]]) -> np.ndarray:
        return np.asarray([1.0 if r and r[0] == batch.ground_truth[int(p)] else -1.0
                           for p, r in zip(prompt_index, responses)], np.float32)


    def validation_batches(self, cfg: Any) -> list[PromptBatch]:
        """Three fixed prompts (scored like training prompts)."""
        prompts = [[5, 6, 7], [9, 10, 11, 12], [40, 41]]
        return [PromptBatch(prompts, [p[0] % 16 + 3 for p in prompts], ["toy"] * 3,
                            [{"set": "toyval"}] * 3)]


def toy_overrides(algo: str = "flowrl", steps: int = 2, **extra: Any) -> list[str]:
    """Config overrides of a tiny run (tiny Qwen2, 4 prompts × 4 samples, 8 new tokens)."""
    ov = {
        "model.preset": "tiny", "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
        "algo.name": algo, "seed": 0, "task.factory": "trainer_toy:ToyTask",
        "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 4,
        "rollout.max_new_tokens": 8, "rollout.decode_slots": 16, "rollout.decode_chunk": 8,
        "rollout.prefill_buckets": "[8]",
        "data.max_prompt_length": 8, "data.length_buckets": "[8]",
        "trainer.steps": steps, "trainer.mini_batch_size": 8, "trainer.micro_batch_size": 4,
        "trainer.logprob_micro_batch_size": 16, "trainer.checkpoint_every": 1,
        "trainer.keep_last": 2, "optimizer.lr": 1e-3, "optimizer.warmup_steps": 0,
        # The engine called directly: the default JetStream path costs ≈ 9 s more per trainer
        # run (its driver's programs); the tests about it ask for it (test_staleness,
        # test_resume, test_jetstream_rollout, the shipped configs and the demo use it as is).
        "rollout.backend": "engine",
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


# --------------------------------------------------------------------------- subprocess runs

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A persistent XLA cache shared by the trainer test subprocesses: entries are keyed by the
# program itself, so reuse is exact; it turns the ~20 s compile of each restart into a load.
XLA_CACHE = Path(tempfile.gettempdir()) / "flowrl-jax-trainer-tests-xla-cache"
VOLATILE = ("time/", "throughput/", "perf/")


def train_env(devices: int = 1, **extra: str) -> dict:
    """Environment of a `flowrl-jax train` subprocess (CPU, `devices` local devices)."""
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(XLA_CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    env.update(extra)
    return env


def start_train(out: Path, overrides: list[str], env: dict | None = None,
                log: Path | None = None) -> subprocess.Popen:
    """Start `python -m flowrl_jax.cli train` on the toy task (no config file)."""
    cmd = [sys.executable, "-m", "flowrl_jax.cli", "train", "--config", os.devnull,
           "--out", str(out), "--no-console", *overrides]
    logf = open(log or (Path(str(out) + ".log")), "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env or train_env(), stdout=logf,
                            stderr=subprocess.STDOUT)


def stable_records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock dependent keys."""
    from flowrl_jax.run_files import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(out)]


def checkpoint_arrays(out: Path, step: int) -> dict:
    """Every array of the policy and train items of a run's checkpoint `step` (numpy)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    res = {}
    ck = ocp.StandardCheckpointer()
    for item in ("policy", "train"):
        tree = ck.restore((out / "checkpoints" / str(step) / item).absolute())
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            res[item + jax.tree_util.keystr(path)] = np.asarray(leaf)
    ck.close()
    return res
