"""Rollout generation: the KV-cache engine (`engine`) and its JetStream serving wrapper
(`jetstream`, imported separately because it needs google-jetstream)."""

from flowrl_jax.sampling.engine import (Rollout, SamplingEngine, SamplingError, SamplingParams,
                                        cache_bytes, generate)

__all__ = ["Rollout", "SamplingEngine", "SamplingError", "SamplingParams", "cache_bytes", "generate"]
