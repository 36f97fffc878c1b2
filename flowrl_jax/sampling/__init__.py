"""Rollout generation: parameters and results (`params`, `results`), random draws
(`random`), logits → token (`logits`), the compiled kernels (`kernels`), the scheduler
(`engine`), the CPU-only fast paths (`cpu_fast_paths`), and the JetStream serving wrapper
(`jetstream`, imported separately because it needs google-jetstream). The model's decode
path (KV-cache layout, decode step) is models/decode.py."""

from flowrl_jax.models.decode import cache_bytes
from flowrl_jax.sampling.engine import SamplingEngine, generate
from flowrl_jax.sampling.params import SamplingError, SamplingParams
from flowrl_jax.sampling.results import Rollout

__all__ = ["Rollout", "SamplingEngine", "SamplingError", "SamplingParams", "cache_bytes", "generate"]
