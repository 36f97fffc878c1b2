"""The weight push of asynchronous rollouts: the trainer's policy params copied device to
device onto the sampler's shardings (its own sub-mesh, or the shared mesh), so the sampler
keeps generating with one version while the train step donates and rewrites the other."""

from __future__ import annotations

import time
from typing import Any

import jax
from flax import nnx

from flowrl_jax.mesh import state_shardings


class WeightPush:
    """`params, seconds = push(policy)`: a fresh copy of `policy` in the sampler's layout
    (never through host memory: `jax.device_put` between device shardings)."""

    def __init__(self, graphdef: Any, sampler_mesh: Any):
        self.graphdef, self.mesh = graphdef, sampler_mesh
        self._shardings: Any = None

    def __call__(self, policy: Any) -> tuple[Any, float]:
        if self._shardings is None:  # the sampler's layout of every leaf, worked out once
            abstract = nnx.state(nnx.merge(self.graphdef, policy))
            self._shardings = state_shardings(abstract, self.mesh)
        t0 = time.perf_counter()
        # may_alias=False: a copy even where the layouts match (the train step donates policy)
        out = jax.device_put(policy, self._shardings, may_alias=False)
        jax.block_until_ready(out)
        return out, time.perf_counter() - t0
