"""Up-front memory estimate per device, so a config that cannot fit fails before any compute.

The estimate is deliberately simple and slightly pessimistic:
  params      N·bytes(param_dtype) / (fsdp·tensor)          (policy weights, sharded)
  ref         same again unless `trainer.ref_offload` or the algorithm needs no reference
  grads       N·bytes(param_dtype) / (fsdp·tensor)          (accumulated gradients)
  optimizer   2·N·4 / (fsdp·tensor)                          (AdamW μ, ν in float32)
  kv_cache    2·L·kv·hd·(prompt+response)·slots·bytes(compute) / (data·fsdp · tensor split),
              at most rollout.kv_cache_gib / (tensor split) with the paged cache
  activations per micro-batch row: L·S·H·bytes·k (k = 34 without remat, 2 with, plus one
              layer's worth), plus the chunked logits (chunk·V·4) of the log-prob pass
  A separate critic model (`algo.critic: model`, PPO) adds its own params, grads, AdamW
  moments and layer activations (the same sizes as the policy's; no logits).
The device budget is `trainer.device_memory_gb`, else `memory_stats()['bytes_limit']`, else
(CPU) host RAM shared by the local devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import Config, ConfigError, ModelArch
from flowrl_jax.models.arch import param_count

GiB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each component, the total and the budget."""

    params: float
    ref: float
    grads: float
    optimizer: float
    kv_cache: float
    activations: float
    budget: float
    budget_source: str
    n_params: int

    @property
    def total(self) -> float:
        return (self.params + self.ref + self.grads + self.optimizer +
                max(self.kv_cache, self.activations))  # sampling and training alternate

    def fits(self, headroom: float = 0.9) -> bool:
        """Whether the total stays under `headroom` of the budget."""
        return self.total <= headroom * self.budget

    def table(self) -> str:
        """A human-readable summary (GiB per device)."""
        rows = [("params", self.params), ("reference", self.ref), ("grads", self.grads),
                ("optimizer", self.optimizer), ("kv cache (sampling)", self.kv_cache),
                ("activations (train)", self.activations)]
        lines = [f"memory estimate per device ({self.n_params / 1e6:.1f}M params):"]
        lines += [f"  {k:<22}{v / GiB:9.2f} GiB" for k, v in rows]
        lines.append(f"  {'total':<22}{self.total / GiB:9.2f} GiB of {self.budget / GiB:.2f} GiB "
                     f"({self.budget_source})")
        return "\n".join(lines)


def device_budget(cfg: Config) -> tuple[float, str]:
    """Usable bytes per device and where the number came from."""
    override = getattr(cfg.trainer, "device_memory_gb", None)
    if override:
        return float(override) * GiB, "trainer.device_memory_gb"
    import jax

    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{dev.platform} memory_stats"
    import psutil

    return psutil.virtual_memory().total / max(1, jax.local_device_count()), \
        "host RAM / local devices"


def estimate(cfg: Config, arch: ModelArch, mesh_shape: dict[str, int],
             budget: Optional[tuple[float, str]] = None, uses_ref: bool = True,
             sampler_local_devices: Optional[int] = None) -> MemoryEstimate:
    """Per-device memory of a run with this config on a mesh of `mesh_shape` axis sizes.

    `sampler_local_devices`: on multi-process runs each host samples with its own copy of
    the policy sharded over its local devices; that copy counts with the KV cache.
    """
    n = param_count(arch)
    pb = _BYTES[cfg.model.param_dtype]
    cb = _BYTES[cfg.model.compute_dtype]
    shard = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
    batch_shard = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    # models trained: the policy, and a separate critic model when the algorithm has one
    trained = 2 if critic_model(cfg) else 1
    params = trained * n * pb / shard
    ref = 0.0 if (cfg.trainer.ref_offload or not uses_ref) else n * pb / shard
    grads = trained * n * pb / shard
    optimizer = trained * 2 * n * 4 / shard
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    kv_heads_split = max(1, min(tensor, arch.num_key_value_heads))
    slots = min(cfg.rollout.decode_slots,
                cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
    kv = (2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.resolved_head_dim * seq *
          max(1, slots // batch_shard) * cb / kv_heads_split)
    if cfg.rollout.kv_cache == "paged" and cfg.rollout.kv_cache_gib is not None:
        # the page pool: the configured budget (at most the dense cache), split by kv heads
        kv = min(kv, cfg.rollout.kv_cache_gib * GiB / kv_heads_split)
    if sampler_local_devices:
        kv += n * pb / sampler_local_devices
    rows = max(1, cfg.trainer.micro_batch_size // batch_shard)
    k = 2 if cfg.model.remat != "none" else 34
    act = (trained * rows * seq * arch.hidden_size * cb *
           (k * arch.num_hidden_layers + (34 if k == 2 else 0)))
    act += rows * min(seq, cfg.trainer.logprob_chunk) * arch.vocab_size * 4 / tensor
    b, src = budget if budget is not None else device_budget(cfg)
    return MemoryEstimate(params, ref, grads, optimizer, kv, act, b, src, n)


def critic_model(cfg: Config) -> bool:
    """Whether the run trains a separate critic model (`algo.critic: model` with PPO)."""
    return (get_algorithm(cfg.algo.name).needs_critic and
            getattr(cfg.algo, "critic", "head") == "model")


def advice(cfg: Config, est: MemoryEstimate, mesh_shape: dict[str, int]) -> list[str]:
    """Concrete config changes that reduce the estimate, biggest lever first."""
    tips = []
    static = est.params + est.ref + est.grads + est.optimizer
    if static > 0.5 * est.budget:
        tips.append(f"shard the weights further: raise mesh.fsdp (now {mesh_shape.get('fsdp')}) "
                    "or use more devices")
        if cfg.model.param_dtype == "float32":
            tips.append("model.param_dtype=bfloat16 halves params and grads")
        if est.ref and not cfg.trainer.ref_offload:
            tips.append("trainer.ref_offload=true keeps the reference weights on the host")
    if est.activations >= est.kv_cache:
        if cfg.trainer.micro_batch_size > 1:
            tips.append(f"trainer.micro_batch_size (now {cfg.trainer.micro_batch_size}) smaller")
        if cfg.model.remat == "none":
            tips.append("model.remat=true recomputes layer activations in the backward pass")
        if cfg.model.compute_dtype == "float32":
            tips.append("model.compute_dtype=bfloat16 halves activations")
    else:
        tips.append(f"rollout.decode_slots (now {cfg.rollout.decode_slots}) smaller, or "
                    "rollout.max_new_tokens / data.max_prompt_length shorter (KV cache)")
    return tips


def check_fits(cfg: Config, arch: ModelArch, mesh_shape: dict[str, int],
               uses_ref: bool = True, sampler_local_devices: Optional[int] = None
               ) -> MemoryEstimate:
    """Estimate and raise ConfigError with advice when the run cannot fit a device."""
    est = estimate(cfg, arch, mesh_shape, uses_ref=uses_ref,
                   sampler_local_devices=sampler_local_devices)
    if not est.fits():
        tips = "\n  - ".join(advice(cfg, est, mesh_shape))
        raise ConfigError(
            f"trainer.device_memory_gb: the run needs ~{est.total / GiB:.2f} GiB per device but "
            f"{est.budget / GiB:.2f} GiB are available ({est.budget_source}).\n{est.table()}\n"
            f"Try:\n  - {tips}")
    return est
