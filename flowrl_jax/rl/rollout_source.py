"""What generates the trainer's rollouts and how it gets the weights.

- `rollout.servers` set: remote `flowrl-jax serve` processes (sampling/remote_rollouts.py);
  before a rollout the policy is written to OUT/rollout_weights and loaded by the servers
  (rl/server_weights.py). The servers replace the in-process sampler: `rollout.backend`
  is not used then.
- else `rollout.backend: jetstream` (the default): every sample is a request to an
  in-process JetStream driver over the engine's adapter (sampling/jetstream_rollout.py);
- `rollout.backend: engine`: the sampling engine called directly (sampling/engine.py).

The in-process sampler reads the trainer's own param arrays, or with asynchronous rollouts
(`trainer.staleness` ≥ 1) or a sampler sub-mesh (`rollout.devices`) its own copy, pushed
device to device after each update (rl/weight_push.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax

from flowrl_jax.config import Config, ConfigError, ModelArch
from flowrl_jax.rl.weight_push import WeightPush
from flowrl_jax.sampling.engine import SamplingEngine


def uses_jetstream(cfg: Config) -> bool:
    """Whether the rollouts go through an in-process JetStream driver."""
    return cfg.rollout.backend == "jetstream" and not cfg.rollout.servers


def check_rollout_source(cfg: Config, out: Any) -> None:
    """Checks that need no compute: remote servers need one trainer process and a local run
    directory; the JetStream backend needs google-jetstream (the serve extra)."""
    if cfg.rollout.servers and (jax.process_count() > 1 or not isinstance(out, Path)):
        raise ConfigError("rollout.servers: remote rollout servers need one trainer process "
                          "and a run directory on a file system the servers share (the "
                          f"weights go through it); this run has {jax.process_count()} "
                          f"process(es) and --out {out}")
    if uses_jetstream(cfg):
        try:
            # JetStream: an optional dependency (the serve extra), imported only when used.
            # `import a.b.c` consults sys.modules; `from a.b import c` would take the package
            # attribute left by an earlier import and miss a module made unimportable since.
            import flowrl_jax.sampling.jetstream_rollout  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "rollout.backend: the default backend 'jetstream' needs google-jetstream and "
                "the serve extra, which are not importable here "
                f"({e}); install them (`make venv`, or `pip install 'flowrl-jax[serve]' && "
                "pip install --no-deps google-jetstream==0.2.2`) or set "
                "rollout.backend=engine") from e


@dataclass
class RolloutSource:
    """The sampler (`generate(params, prompts, sampling) -> Rollout`) and its weight paths."""

    engine: SamplingEngine  # the in-process engine (also the others' prompt checks, stop ids)
    sampler: Any  # the engine itself, JetStream drivers over it, or remote servers
    server_push: Optional[Any] = None  # `seconds = push(policy, version)` to remote servers
    push: Optional[WeightPush] = None  # `params, seconds = push(policy)` onto the sampler's copy

    def close(self) -> None:
        """Stop the sampler's threads (JetStream drivers, server channels)."""
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()


def build_rollout_source(cfg: Config, model: Any, sample_mesh: Any, out: Path, arch: ModelArch,
                         tokenizer_dir: Optional[str]) -> RolloutSource:
    """The rollout source of `cfg` over the policy `model` on `sample_mesh`."""
    engine = SamplingEngine.from_rollout_config(model, cfg.rollout, mesh=sample_mesh,
                                                verbose=False)
    source = RolloutSource(engine, engine)
    if cfg.rollout.servers:
        # gRPC: an optional dependency (the serve extra), imported only when used
        from flowrl_jax.rl.server_weights import ServerWeights
        from flowrl_jax.sampling.remote_rollouts import RemoteRollouts
        remote = RemoteRollouts(engine, cfg.rollout.servers, timeout_s=cfg.rollout.timeout_s)
        remote.check(arch, cfg.rollout.max_new_tokens)
        source.sampler = remote
        source.server_push = ServerWeights(remote, out, arch, tokenizer_dir)
    elif cfg.rollout.backend == "jetstream":
        # JetStream: an optional dependency (the serve extra), imported only when used
        from flowrl_jax.sampling.jetstream_rollout import JetStreamRollouts
        source.sampler = JetStreamRollouts(engine, timeout_s=cfg.rollout.timeout_s)
    # the sampler's own copy of the weights: asynchronous rollouts or a sampler sub-mesh
    if cfg.trainer.staleness or cfg.rollout.devices is not None:
        source.push = WeightPush(engine.graphdef, sample_mesh)
    return source
