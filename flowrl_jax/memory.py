"""Up-front memory estimate per chip, so a config that cannot fit fails before any compute.

One RL step runs three kinds of program, one after another, each beside the train state
(policy (+ critic) weights, Z_φ, AdamW moments) and the reference copy:
  train step    + gradients (accumulator and one micro-batch's) + activations of a
                  micro-batch + the mini-batch
  log-prob pass + one micro-batch's forward temporaries + the rollout batch and its outputs
  sampling      + the sampler's own copy of the policy (multi-host: each host samples on its
                  own chips) + the KV cache + the decode chunk's temporaries
The per-chip sizes follow the mesh: weights sharded over fsdp·tensor, the batch over
data·fsdp, the KV cache over the sampler's chips (one host's on multi-host runs): the dense
rows by slot, the paged pool in one block of pages per slot shard (pool / slot shards per
chip, the kv heads split over `tensor`). The activation and temporary terms are fitted on the
TPU compiler's own figures (`flowrl-jax check`, sessions 9 and 11 in BUILD_NOTES.md, which
list where they agree within 15 % and where not); off TPU the attention kernel's own terms
apply.
The device budget is `trainer.device_memory_gb`, else `memory_stats()['bytes_limit']`, else
(CPU) host RAM shared by the local devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import Config, ConfigError, ModelArch
from flowrl_jax.mesh import current_platform
from flowrl_jax.models import paged_pallas
from flowrl_jax.models.arch import param_count
from flowrl_jax.sampling.engine import KV_DEFAULT_BYTES, KV_FREE_FRACTION
from flowrl_jax.sampling.kv_budget import kv_bytes_per_token, pages_for

GiB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Calibration against the TPU compiler (BUILD_NOTES.md, `flowrl-jax check`):
#: bytes a remat'd layer keeps per token and hidden unit for the backward pass (its input
#: and what the attention's custom backward saves; 7B train step: 4.3)
REMAT_KEEP = 4
#: bytes per token and hidden unit a layer keeps without remat (attention and MLP inputs,
#: norms, activations; the MLP's intermediate counted through MLP_KEEP)
PLAIN_KEEP = 16
#: bytes per token and MLP unit a layer keeps without remat (gate, up, their product)
MLP_KEEP = 6
#: the blocked attention's float32 score tiles alive at once in the backward pass, in units
#: of one causal half [heads, T, T/2] per row (0.5B, 2 layers: 1.35; 7B: 1.3; BUILD_NOTES)
ATTN_BACKWARD_TILES = 1.3
#: the same in a forward-only pass (0.5B: 0.96, 7B: 1.0)
ATTN_FORWARD_TILES = 0.95
#: with splash attention (TPU) no score tiles exist; what the compiler allocates instead,
#: fitted on the TPU compiles of session 9 (BUILD_NOTES): bytes per token and hidden unit
#: an unrolled remat'd layer keeps for the backward pass (Qwen2.5-0.5B, v5e-8, 2 → 4
#: layers: 26.9; scanned layers: SCAN_GATHERED_LAYERS below),
SPLASH_REMAT_KEEP = 27
#: ... the backward's working set of one layer beyond the MLP/plain terms (0.5B: 45.5),
SPLASH_BACKWARD_WORK = 45.5
#: ... layers of whole (gathered) weights alive in the train step (7B width, 2 layers: 1.6)
SPLASH_GATHERED_LAYERS = 1.6
#: ... and a log-prob pass's temporaries per token and hidden unit beyond the logits: a
#: fixed part, which is the chip's, not the head width's (session 11, scanned, 2 rows per
#: chip: Qwen2.5-0.5B (64-wide heads) and 1.5B (128-wide) on v5e-8 both fit 38; 7B on
#: v5p-64 fits 6; other or unknown generations get the larger), and with heads narrower
#: than the TPU's 128 lanes and unrolled layers a per-layer part (0.5B, v5e-8, 2 / 4 / 24
#: layers, micro-batch 32: 15.85)
SPLASH_LANES = 128
SPLASH_FORWARD_WORK = 38
SPLASH_V5P_FORWARD_WORK = 6
#: layers of whole weights alive in a log-prob pass (7B, v5p-64, full depth: 2.3)
SPLASH_FORWARD_GATHERED_LAYERS = 2.3
#: the per-layer part of narrow heads is the unrolled form's (the compiler kept each
#: layer's buffers); scanned layers reuse one layer's (Qwen2.5-0.5B, 24 scanned layers,
#: micro-batch 16, v5e-8: 1.86 GiB compiled, 8.43 estimated with the per-layer part)
SPLASH_NARROW_FORWARD_KEEP = 15.85
#: scanned layers (`model.scan_layers`, the default) under remat: each layer keeps its input
#: in the compute dtype (the scan's saved carry: its bytes per token and hidden unit), and
#: the loop keeps more layers of whole weights alive (gathers pipelined across iterations,
#: a layer's weight gradient before its reduce-scatter; fitted, not itemised): fitted on
#: session 11's full-depth compiles, Qwen2.5-0.5B micro-batch 8 on v5e-8 (3.33 GiB) and
#: Qwen2.5-7B micro-batch 32 on v5p-64 (23.45 GiB; 19.57 with the unrolled-fitted terms),
#: 1 row per chip each
SCAN_GATHERED_LAYERS = 8.3
#: the dense decode chunk's temporaries, in copies of the chip's KV cache: the decode reads
#: the whole cache row at every step (no attention windows since session 11) and the
#: compiler relays the cache out around the loop (Qwen2.5-32B, 16 slots per host × 10,240,
#: v5p-64, 10.0 GiB of cache per chip: 19.74 GiB of temporaries, 72.30 in all; with the old
#: windows 80.90). One compile: GPU and CPU are not measured
DENSE_DECODE_CACHE_COPIES = 1.25
#: float32 [slots, vocab] buffers of a decode step (logits, sampling)
DECODE_LOGIT_COPIES = 3
#: layers of the sampler's weights the decode loop holds gathered (unsharded) at once
#: (32B at 32 slots per host: 12.8 GiB beyond the cache copies)
DECODE_GATHERED_LAYERS = 4
#: the paged decode chunk's temporaries on TPU (xla path), in a chip's share of the page
#: pool (the compiler relays the pool out around the decode loop) and in one layer's
#: gathered dense rows (keys + values of the chip's slots over the cache length). Heads
#: narrower than the TPU's 128 lanes (Qwen2.5-0.5B) pay more pool copies and the rows;
#: 128-wide heads none of the rows. Session 10 fitted 1.6 pools + 4 rows on the 0.5B width
#: cut to 2 / 4 layers (small pools); session 11's full-depth compiles refit them:
#: Qwen2.5-0.5B, 64 slots and 3 GiB per chip, v5e-8: 7.74 GiB of temporaries (2.05 pools +
#: 4 rows); Qwen2.5-7B, 128 slots and 16 GiB per chip, v5p-64: 26.32 (1.4 pools, no rows:
#: 4 rows would be 10 GiB more)
PAGED_POOL_COPIES = 2.05
PAGED_ROW_COPIES = 4.0
#: 128-wide heads: Qwen2.5-1.5B, 32 slots and 3 GiB per chip, v5e-8: 3.30 GiB of temporaries
#: (0.85 pools) and the 7B above (1.4): 1.2 puts both within 12 %
PAGED_WIDE_POOL_COPIES = 1.2
#: with the Pallas kernel (`rollout.paged_attention` auto / pallas on TPU and GPU) the decode
#: reads the pool in place: no pool copies (session 11, split pool, v5p-64 7B: 4.50 GiB of
#: temporaries against the xla path's 26.32; v5e-8 1.5B: 0.62 against 3.30; both within 3 %
#: with none counted)
#: the admit program (prefill + insert) of the paged engine on TPU: the prefill holds a few
#: layers of whole weights (DECODE_GATHERED_LAYERS; it computes no logits: 0.12 GiB of
#: temporaries at 0.5B, 4.22 at 7B) and the insert copies a chip's share of the pool when
#: the chip is not a v5p: with heads narrower than 128 lanes (Qwen2.5-0.5B, 3 GiB per chip,
#: v5e-8: the insert alone 7.96 GiB, admit 8.56: 2.8 pools; the 0.5B width at 2 layers and
#: 0.25 GiB: 2.0, so small pools are over-counted), with 128-wide heads fewer (Qwen2.5-1.5B,
#: 3 GiB per chip, v5e-8: admit 5.26 GiB, 1.5 pools); on v5p none (Qwen2.5-7B, 16 GiB per
#: chip: admit 4.28 GiB, insert 1.05). Sessions 9/10 counted the prefill's float32 logits of
#: every prompt position, which the prefill does not compute (`return_logits=False`)
ADMIT_POOL_COPIES = 2.8
ADMIT_WIDE_POOL_COPIES = 1.5


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per chip of each component, each program kind's peak, and the budget."""

    params: float  # trained weights: policy (+ critic model) sharded, Z_φ / value head whole
    ref: float  # the reference copy (0 when offloaded or unused)
    grads: float  # the train step's gradients: the accumulator and one micro-batch's
    optimizer: float  # AdamW μ, ν in float32
    kv_cache: float  # the sampler's KV cache (sharded over the sampler's chips)
    activations: float  # the train step's activations and temporaries, and its mini-batch
    budget: float
    budget_source: str
    n_params: int
    sampler_params: float = 0.0  # the sampler's own copies of the policy (multi-host, async)
    decode_temps: float = 0.0  # a decode chunk's temporaries (cache or pool copies, logits)
    logprob_activations: float = 0.0  # a log-prob pass's temporaries, its batch and outputs
    # how sampling shares the chips: "alternate" (in turn with training, the on-policy
    # trainer), "overlap" (at the same time on the same chips: trainer.staleness >= 1) or
    # "split" (on chips of its own: rollout.devices; the figures are per chip of each role)
    roles: str = "alternate"
    admit_temps: float = 0.0  # the admit program's (prefill + insert) temporaries, if larger
    prefill_temps: float = 0.0  # the prefill's part of admit_temps (paged on TPU; else 0)
    ref_onload: float = 0.0  # an offloaded reference copy, on the chips for its own pass

    @property
    def static(self) -> float:
        """What stays on the chip through the whole step: train state and reference."""
        return self.params + self.ref + self.optimizer

    @property
    def train(self) -> float:
        """Peak of the train step."""
        return self.static + self.grads + self.activations

    @property
    def logprobs(self) -> float:
        """Peak of the old / reference log-prob pass."""
        return self.static + self.logprob_activations

    @property
    def sampler_own(self) -> float:
        """What sampling adds to a chip: its policy copies, KV cache and decode temporaries."""
        return self.sampler_params + self.kv_cache + max(self.decode_temps, self.admit_temps)

    @property
    def sampling(self) -> float:
        """Peak of the sampler's decode chunk (on a sampler chip of its own: no train state)."""
        return self.sampler_own + (0.0 if self.roles == "split" else self.static)

    @property
    def total(self) -> float:
        """The step's peak: sampling, log-prob pass and training in turn, or sampling on top
        of either when they overlap, or the larger role when each has its chips."""
        if self.roles == "overlap":
            return max(self.train, self.logprobs + self.ref_onload) + self.sampler_own
        return max(self.train, self.logprobs + self.ref_onload, self.sampling)

    def program_bytes(self, program: str) -> float:
        """The peak of one of `flowrl-jax check`'s programs (train_step, logprobs_*,
        sampler_*)."""
        if program == "train_step":
            return self.train
        if program == "logprobs_ref":  # an offloaded reference comes on for its pass
            return self.logprobs + self.ref_onload
        if program.startswith("logprobs"):
            return self.logprobs
        # the sampling peak without its largest program's temporaries: the pool and weights
        base = self.sampling - max(self.decode_temps, self.admit_temps)
        if program == "sampler_decode":
            return base + self.decode_temps
        if program == "sampler_admit":
            return base + self.admit_temps
        if self.prefill_temps and program == "sampler_prefill":
            return base + self.prefill_temps
        if self.prefill_temps and program == "sampler_insert":
            return base + self.admit_temps - self.prefill_temps
        return self.sampling

    def fits(self, headroom: float = 0.9) -> bool:
        """Whether the peak stays under `headroom` of the budget."""
        return self.total <= headroom * self.budget

    def table(self) -> str:
        """A human-readable summary (GiB per chip)."""
        rows = [("params", self.params), ("reference", self.ref), ("optimizer", self.optimizer),
                ("grads (train)", self.grads), ("activations (train)", self.activations),
                ("log-prob pass", self.logprob_activations),
                ("sampler copy", self.sampler_params), ("kv cache (sampling)", self.kv_cache),
                ("decode temporaries", self.decode_temps), ("admit temporaries", self.admit_temps)]
        lines = [f"memory estimate per device ({self.n_params / 1e6:.1f}M params):"]
        lines += [f"  {k:<22}{v / GiB:9.2f} GiB" for k, v in rows if v or k == "params"]
        lines.append(f"  {'peaks':<22}train {self.train / GiB:.2f}, log-probs "
                     f"{self.logprobs / GiB:.2f}, sampling {self.sampling / GiB:.2f} GiB"
                     + {"alternate": "", "overlap": " (sampling overlaps the others)",
                        "split": " (sampling on chips of its own)"}[self.roles])
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


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _bucket(n: int, buckets: list[int]) -> int:
    """Smallest bucket ≥ n; beyond the largest, the next multiple of it (the sampler's rule)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    top = max(buckets)
    return int(math.ceil(n / top) * top)


def sampler_geometry(cfg: Config, chips: int, batch_shards: int,
                     hosts: int) -> tuple[int, int]:
    """(slots, cache length) of one sampler: the engine's rule for the requests one host
    runs per rollout step (`prompts_per_step × samples_per_prompt / hosts`)."""
    requests = max(1, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt // hosts)
    slots = min(cfg.rollout.decode_slots, max(_pow2(requests), batch_shards))
    slots = int(math.ceil(slots / batch_shards) * batch_shards)
    prompt = _bucket(max(1, cfg.data.max_prompt_length - 1), cfg.rollout.prefill_buckets)
    return slots, prompt + int(math.ceil(cfg.rollout.max_new_tokens / 32) * 32)


def z_param_count(cfg: Config, hidden: int) -> int:
    """Z_φ's parameters (replicated): `z_depth` × (Linear H→H, LayerNorm) + Linear H→1."""
    if not get_algorithm(cfg.algo.name).needs_z or cfg.algo.log_z == "zero":
        return 0
    if cfg.algo.log_z == "scalar":
        return 1
    return cfg.algo.z_depth * (hidden * hidden + 3 * hidden) + hidden + 1


def critic_model(cfg: Config) -> bool:
    """Whether the run trains a separate critic model (`algo.critic: model` with PPO)."""
    return (get_algorithm(cfg.algo.name).needs_critic and
            getattr(cfg.algo, "critic", "head") == "model")


def attention_kernel(cfg: Config, platform: str) -> str:
    """The no-cache attention the train step and log-prob pass run on `platform`
    (`models.attention.no_cache_kernel`'s rule): "splash" on TPU, "fused" (cuDNN), "flash"
    (blocked, with the score tiles counted) or "softmax"."""
    impl = cfg.model.attention
    if impl == "splash" or (impl == "auto" and platform == "tpu"):
        return "splash"
    if impl == "cudnn":
        return "fused"
    return "softmax" if impl == "xla" else "flash"


def attention_tiles(arch: ModelArch, rows: float, seq: int, tensor: int, tiles: float) -> float:
    """Bytes of the blocked attention's float32 score tiles: `tiles` causal halves of
    [heads, T, T] per row (the heads split by the tensor axis)."""
    heads = arch.num_attention_heads / max(1, min(tensor, arch.num_attention_heads))
    return rows * tiles * heads * seq * seq / 2 * 4


def estimate(cfg: Config, arch: ModelArch, mesh_shape: dict[str, int],
             budget: Optional[tuple[float, str]] = None, uses_ref: bool = True,
             sampler_local_devices: Optional[int] = None,
             sampler_devices: Optional[int] = None, *, platform: Optional[str] = None,
             devices_report_memory: Optional[bool] = None,
             tpu_generation: Optional[str] = None) -> MemoryEstimate:
    """Per-chip memory of a run with this config on a mesh of `mesh_shape` axis sizes.

    `sampler_local_devices`: on multi-process runs each host samples with its own copy of
    the policy sharded over its local devices, and its KV cache over the same devices.
    `sampler_devices`: the sampler's own chips (`rollout.devices`; `mesh_shape` is then the
    trainer's share); it holds the policy copies and KV cache over them (fsdp only).
    `platform`: where the programs run (None: the current one): it picks the attention
    kernel (splash on TPU) whose temporaries are counted. `tpu_generation` ("v5e", "v5p",
    ...; None: unknown): a few TPU terms differ by chip (fitted on v5e and v5p; an unknown
    generation gets the larger). `devices_report_memory`: whether
    the paged engine sees the chips' free memory when it sizes its pool (None: off CPU;
    `flowrl-jax check`'s abstract TPU devices do not, so it compiles the default pool).
    """
    platform = platform or current_platform()
    n = param_count(arch)
    pb = _BYTES[cfg.model.param_dtype]
    cb = _BYTES[cfg.model.compute_dtype]
    data, fsdp = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    chips = data * fsdp * tensor
    shard, batch_shard = fsdp * tensor, data * fsdp
    h, i, L, v = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.vocab_size
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    resp = cfg.rollout.max_new_tokens

    # the train state: models trained (policy, and a separate critic model), Z_φ / value head
    trained = 2 if critic_model(cfg) else 1
    small = z_param_count(cfg, h) + ((h + 1) if get_algorithm(cfg.algo.name).needs_critic else 0)
    params = trained * n * pb / shard + small * 4
    ref = 0.0 if (cfg.trainer.ref_offload or not uses_ref) else n * pb / shard
    optimizer = 2 * 4 * (trained * n / shard + small)
    micro = max(1, cfg.trainer.mini_batch_size // max(1, cfg.trainer.micro_batch_size))
    grads = (2 if micro > 1 else 1) * 4 * (trained * n / shard + small)

    # one decoder layer's weights, whole (the fsdp all-gather of a layer: the compiler keeps
    # a few alive around the one computing)
    layer_params = (n - v * h * (1 if arch.tie_word_embeddings else 2)) / max(1, L)

    # train step: one micro-batch's activations (per chip) + the mini-batch
    rows = max(1.0, cfg.trainer.micro_batch_size / batch_shard)
    remat = cfg.model.remat != "none"
    splash = attention_kernel(cfg, platform) == "splash"
    scanned = cfg.model.scan_layers
    keep = ((((cb if scanned else SPLASH_REMAT_KEEP) if splash else REMAT_KEEP) * h)
            if remat
            else (PLAIN_KEEP * h + MLP_KEEP * i / tensor))
    gathered = SCAN_GATHERED_LAYERS if scanned and remat else SPLASH_GATHERED_LAYERS
    layer_work = ((rows * seq * SPLASH_BACKWARD_WORK * h
                   + gathered * layer_params * pb * trained if splash else
                   attention_tiles(arch, rows, seq, tensor, ATTN_BACKWARD_TILES))
                  + rows * seq * (MLP_KEEP * i / tensor + PLAIN_KEEP * h))
    act = trained * (rows * seq * L * keep + layer_work)
    act += logits_block(cfg, arch, cfg.trainer.micro_batch_size, resp, tensor) / batch_shard * 3
    act += max(1.0, cfg.trainer.mini_batch_size / batch_shard) * (2 * seq + 6 * resp) * 4

    # log-prob pass: one micro-batch's forward + the rollout batch in and its outputs out
    lp_total = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    lp_mb = min(lp_total, cfg.trainer.logprob_micro_batch_size)
    lp_rows = max(1.0, lp_mb / batch_shard)
    # (on a chip with room to spare the TPU compiler also keeps gathered weights alive across
    # the micro-batch loop: 7B on v5p, +1.8 GiB per layer; not counted, it is not needed)
    v5p = tpu_generation == "v5p"
    if splash:  # fitted per chip and head width (BUILD_NOTES, session 11)
        narrow = arch.resolved_head_dim < SPLASH_LANES  # 64-wide heads fill TPU lanes by half
        per_layer = L * SPLASH_NARROW_FORWARD_KEEP if narrow and not cfg.model.scan_layers else 0
        work = SPLASH_V5P_FORWARD_WORK if v5p else SPLASH_FORWARD_WORK
        lp = (lp_rows * seq * h * (work + per_layer)
              + SPLASH_FORWARD_GATHERED_LAYERS * layer_params * pb)
    else:
        lp = (attention_tiles(arch, lp_rows, seq, tensor, ATTN_FORWARD_TILES)
              + lp_rows * seq * (MLP_KEEP * i / tensor + PLAIN_KEEP * h))
    lp += logits_block(cfg, arch, lp_mb, resp, tensor) / batch_shard * 2
    lp += max(1.0, lp_total / batch_shard) * (2 * seq + 3 * resp) * 4

    # sampling: one host's chips (all of them on a single host) hold the slots
    local = sampler_devices or sampler_local_devices or chips
    hosts = 1 if sampler_devices else max(1, chips // local)
    s_shards, s_tensor = ((batch_shard, tensor) if hosts == 1 and not sampler_devices
                          else (local, 1))
    slots, length = sampler_geometry(cfg, local, s_shards, hosts)
    kv_split = max(1, min(s_tensor, arch.num_key_value_heads))
    kv = (2 * L * arch.num_key_value_heads * arch.resolved_head_dim * length * slots * cb
          / (s_shards * kv_split))
    # the sampler's own policy copies: one per host on several hosts; one on chips of its
    # own; two with asynchronous rollouts (the one sampling, the next pushed beside it)
    copies = max(2 if cfg.trainer.staleness else 0,
                 1 if (hosts > 1 or sampler_devices) else 0)
    sampler_params = copies * n * pb / local
    b, src = budget if budget is not None else device_budget(cfg)
    paged = cfg.rollout.kv_cache == "paged"
    layer_rows = kv / max(1, L)  # one layer's dense keys + values of the chip's slots
    if paged:  # the pool replaces the dense cache: a block of pages per slot shard
        if devices_report_memory is None:
            devices_report_memory = platform != "cpu"
        resident = sampler_params + (0.0 if sampler_devices else params + ref + optimizer)
        kv = paged_pool_bytes(cfg, arch, slots, length, kv_split,
                              free=max(0.0, b - resident) if devices_report_memory else None,
                              slot_shards=s_shards)
    # dense: copies of the cache; paged: copies of the whole pool
    # (the pool copies are the TPU compiler's; elsewhere one layer's gathered pages, unmeasured)
    lanes_narrow = arch.resolved_head_dim < SPLASH_LANES  # TPU lanes half empty: more copies
    tpu_paged = paged and platform == "tpu"
    kernel = paged and paged_kernel_runs(cfg, arch, platform)
    copies = (0.0 if kernel else
              ((PAGED_POOL_COPIES if lanes_narrow else PAGED_WIDE_POOL_COPIES)
               if platform == "tpu" else 1.0 / max(1, L)) if paged else
              DENSE_DECODE_CACHE_COPIES)
    gathered_weights = min(L, DECODE_GATHERED_LAYERS) * layer_params * pb
    decode = (copies * kv
              + (PAGED_ROW_COPIES * layer_rows if tpu_paged and lanes_narrow else 0.0)
              + DECODE_LOGIT_COPIES * slots / s_shards * v * 4
              + (gathered_weights if s_shards > 1 else 0))

    # admitting (prefill of a batch of prompts + insert into the pool): the prefill's gathered
    # weights and, with narrow heads, copies of the chip's pool (no logits: ADMIT_POOL_COPIES)
    # (dense or paged: the 32B dense admit on v5p-64 has 17.87 GiB of temporaries, ≈ 10 of its
    # layers; 4 puts it at −13 %)
    prefill = gathered_weights if platform == "tpu" and s_shards > 1 else 0.0
    admit_copies = 0.0 if v5p else ADMIT_POOL_COPIES if lanes_narrow else ADMIT_WIDE_POOL_COPIES
    admit = prefill + (admit_copies * kv if tpu_paged else 0.0)
    roles = "split" if sampler_devices else ("overlap" if cfg.trainer.staleness else "alternate")
    return MemoryEstimate(params, ref, grads, optimizer, kv, act, b, src, n,
                          sampler_params, decode, lp, roles, admit, prefill,
                          n * pb / shard if uses_ref and cfg.trainer.ref_offload else 0.0)


def paged_kernel_runs(cfg: Config, arch: ModelArch, platform: str) -> bool:
    """Whether the paged decode runs the Pallas kernel (`rollout.paged_attention`) on
    `platform`: it reads the pool in place, so decode makes no pool copies."""
    choice = cfg.rollout.paged_attention
    if choice == "pallas" and paged_pallas.unsupported(platform, arch.resolved_head_dim,
                                                       cfg.rollout.page_size):
        return False  # the engine refuses it; the estimate stays on the xla path's side
    return paged_pallas.resolve(choice, platform, arch.resolved_head_dim,
                                cfg.rollout.page_size) == "pallas"


def logits_block(cfg: Config, arch: ModelArch, batch: int, resp: int, tensor: int) -> float:
    """Bytes of one float32 [batch, chunk, vocab] logits block of the chunked log-probs
    (the chunk rule of `rl.forward.logprob_chunk`: ≤ trainer.logprob_chunk, ≤ 2²⁷ elements)."""
    cmax = max(1, min(cfg.trainer.logprob_chunk, 2 ** 27 // max(1, batch * arch.vocab_size), resp))
    chunk = -(-resp // -(-resp // cmax))
    return batch * chunk * arch.vocab_size * 4 / max(1, tensor)


def paged_pool_bytes(cfg: Config, arch: ModelArch, slots: int, length: int, kv_split: int,
                     free: Optional[float], slot_shards: int = 1) -> float:
    """Bytes per chip of the paged engine's page pool (`SamplingEngine.pool_pages`' rule):
    `rollout.kv_cache_gib` (the whole pool), else KV_FREE_FRACTION of the chip's `free` bytes
    (devices that report it), else KV_DEFAULT_BYTES; at most every slot's full length plus a
    null page per slot shard. The pages are split over the `slot_shards` shards of the slots
    (one block each, whole pages per block), the kv heads over `kv_split` chips: a chip
    holds pool / (slot_shards × kv_split)."""
    page = cfg.rollout.page_size
    page_bytes = page * kv_bytes_per_token(arch, cfg.model.compute_dtype)
    shards = max(1, slot_shards)
    full = slots // shards * pages_for(length, page) + 1  # per shard
    if cfg.rollout.kv_cache_gib is not None:
        pool_budget = cfg.rollout.kv_cache_gib * GiB
    elif free is not None:
        pool_budget = KV_FREE_FRACTION * free * kv_split * shards
    else:
        pool_budget = KV_DEFAULT_BYTES
    per_shard = max(2, min(full, int(pool_budget // page_bytes) // shards))
    return per_shard * page_bytes / kv_split


def advice(cfg: Config, est: MemoryEstimate, mesh_shape: dict[str, int]) -> list[str]:
    """Concrete config changes that reduce the estimate, biggest lever first."""
    tips = []
    if est.static > 0.5 * est.budget:
        tips.append(f"shard the weights further: raise mesh.fsdp (now {mesh_shape.get('fsdp')}) "
                    "or use more devices")
        if cfg.model.param_dtype == "float32":
            tips.append("model.param_dtype=bfloat16 halves params and grads")
        if est.ref and not cfg.trainer.ref_offload:
            tips.append("trainer.ref_offload=true keeps the reference weights on the host")
    if est.train >= max(est.sampling, est.logprobs):
        if cfg.trainer.micro_batch_size > 1:
            tips.append(f"trainer.micro_batch_size (now {cfg.trainer.micro_batch_size}) smaller")
        if cfg.model.remat == "none":
            tips.append("model.remat=true recomputes layer activations in the backward pass")
        if cfg.model.compute_dtype == "float32":
            tips.append("model.compute_dtype=bfloat16 halves activations")
    elif est.logprobs >= est.sampling:
        tips.append(f"trainer.logprob_micro_batch_size (now "
                    f"{cfg.trainer.logprob_micro_batch_size}) smaller")
    elif cfg.rollout.kv_cache == "paged":
        tips.append(f"rollout.kv_cache_gib (now {cfg.rollout.kv_cache_gib}) smaller: the page "
                    "pool, split over the sampler's slot shards; decoding adds about two copies "
                    "of a chip's share")
    else:
        tips.append(f"rollout.decode_slots (now {cfg.rollout.decode_slots}) smaller, or "
                    "rollout.max_new_tokens / data.max_prompt_length shorter (KV cache)")
    return tips


def check_fits(cfg: Config, arch: ModelArch, mesh_shape: dict[str, int],
               uses_ref: bool = True, sampler_local_devices: Optional[int] = None,
               sampler_devices: Optional[int] = None) -> MemoryEstimate:
    """Estimate and raise ConfigError with advice when the run cannot fit a device."""
    est = estimate(cfg, arch, mesh_shape, uses_ref=uses_ref,
                   sampler_local_devices=sampler_local_devices, sampler_devices=sampler_devices)
    if not est.fits():
        tips = "\n  - ".join(advice(cfg, est, mesh_shape))
        raise ConfigError(
            f"trainer.device_memory_gb: the run needs ~{est.total / GiB:.2f} GiB per device but "
            f"{est.budget / GiB:.2f} GiB are available ({est.budget_source}).\n{est.table()}\n"
            f"Try:\n  - {tips}")
    return est
