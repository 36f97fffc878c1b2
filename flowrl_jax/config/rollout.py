"""`rollout` and `eval`: how responses are sampled, for the training rollouts and for
validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from flowrl_jax.config.check import check


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling of responses for one rollout step."""

    prompts_per_step: int = 512
    samples_per_prompt: int = 8  # G
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    decode_slots: int = 256  # continuous-batching slots
    decode_chunk: int = 64  # decode steps per on-device loop before the host refills slots
    prefill_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # "jetstream": every sample is a request to an in-process JetStream driver over the
    # engine's adapter (needs google-jetstream, the serve extra); "engine": the trainer calls
    # the sampling engine directly (same samples: per-sample keys). Unused with `servers`.
    backend: Literal["engine", "jetstream"] = "jetstream"
    # a rollout not complete by then is an error (jetstream; the background one of staleness ≥ 1)
    timeout_s: float = 600.0
    # KV cache: "paged" (pages of page_size positions from one pool, shared prompt pages) or
    # "dense" (a full-length row per slot: the tested reference)
    kv_cache: Literal["paged", "dense"] = "paged"
    page_size: int = 64
    kv_cache_gib: Optional[float] = None  # pool budget; None: 80 % of free device memory (CPU: 4)
    # paged decode attention: "pallas" = JAX's Pallas paged-attention kernels (TPU / GPU; Pallas
    # interpret mode elsewhere: tests), "xla" = page gather + XLA attention; auto: pallas on TPU/GPU
    paged_attention: Literal["auto", "xla", "pallas"] = "auto"
    # The sampler's own devices: a count (4) or a fraction (0.5) of the mesh's devices, the
    # first ones; the trainer gets the rest. None: both roles time-share all devices.
    devices: Optional[Union[int, float]] = None
    # Remote `flowrl-jax serve` processes ("host:port") that generate the rollouts instead of
    # the in-process sampler (the weights go through OUT/rollout_weights on shared storage)
    servers: tuple[str, ...] = ()

    def validate(self, key: str = "rollout") -> None:
        check(self.prompts_per_step > 0, f"{key}.prompts_per_step", "must be > 0")
        check(self.samples_per_prompt > 0, f"{key}.samples_per_prompt", "must be > 0")
        check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        check(self.temperature > 0, f"{key}.temperature",
              "must be > 0 for RL rollouts (log-probs are taken at this temperature)")
        check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, f"{key}.top_k", "must be >= 0 (0 = off)")
        check(0 <= self.min_p < 1, f"{key}.min_p", "must be in [0, 1)")
        check(self.decode_slots > 0, f"{key}.decode_slots", "must be > 0")
        check(self.decode_chunk > 0, f"{key}.decode_chunk", "must be > 0")
        check(self.backend in ("engine", "jetstream"), f"{key}.backend",
              f"must be 'engine' or 'jetstream', got {self.backend!r}")
        check(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        check(self.kv_cache in ("paged", "dense"), f"{key}.kv_cache", "must be paged or dense")
        check(self.page_size > 0, f"{key}.page_size", "must be > 0")
        check(self.kv_cache_gib is None or self.kv_cache_gib > 0, f"{key}.kv_cache_gib",
              "must be > 0 (or null: a share of free device memory)")
        check(self.paged_attention in ("auto", "xla", "pallas"), f"{key}.paged_attention",
              "must be auto, xla or pallas")
        d = self.devices
        check(d is None or (isinstance(d, int) and d >= 1) or (isinstance(d, float) and 0 < d < 1),
              f"{key}.devices", f"must be a device count >= 1 or a fraction in (0, 1), got {d!r}")
        for i, server in enumerate(self.servers):
            host, sep, port = server.rpartition(":")
            check(bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536),
                  f"{key}.servers[{i}]", f"must be host:port, got {server!r}")
        check(len(set(self.servers)) == len(self.servers), f"{key}.servers",
              f"lists a server twice: {list(self.servers)}")
        if self.servers:  # they replace the in-process sampler (rollout.backend is unused)
            check(self.devices is None, f"{key}.servers",
                  "remote servers replace the sampler's own devices; unset rollout.devices")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic validation during training (and defaults for `flowrl-jax eval`)."""

    sets: tuple[str, ...] = ()
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    greedy: bool = False
    max_new_tokens: int = 8192
    limit: Optional[int] = None

    def validate(self, key: str = "eval") -> None:
        check(self.n > 0, f"{key}.n", "must be > 0")
        check(self.temperature >= 0, f"{key}.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        check(self.limit is None or self.limit > 0, f"{key}.limit", "must be > 0")

