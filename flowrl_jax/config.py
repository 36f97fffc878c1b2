"""Frozen dataclass configs for every section; YAML loading with includes and dotted overrides.

A config file is YAML whose top-level keys are the sections of `Config`. It may name other
files under `include:` (paths relative to it, merged first, later files win). Command-line
overrides are `section.key=value` strings, parsed as YAML scalars. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the dotted key.

One concept, the run's settings, in one file although it is long: each section's fields sit
next to the `validate` that checks them, and the loader below walks those same dataclasses
(types, defaults, nested sections) to coerce YAML, so the two halves change together.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from flowrl_jax.errors import ConfigError  # noqa: F401 (re-exported)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelArch:
    """Qwen2/Qwen2.5 architecture: everything a HF Qwen2 `config.json` can say."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None → hidden_size // num_attention_heads
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    attention_bias: bool = True  # q/k/v biases (Qwen2 has them; there is never an o bias)
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151643
    hidden_act: str = "silu"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, key: str = "model.arch") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"{key}.num_key_value_heads",
               f"{self.num_attention_heads} attention heads are not a multiple of "
               f"{self.num_key_value_heads} key/value heads")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_attention_heads == 0, f"{key}.hidden_size",
                   "not divisible by num_attention_heads and head_dim is not given")
        _check(self.rope_theta > 0, f"{key}.rope_theta", "must be > 0")
        _check(self.rms_norm_eps > 0, f"{key}.rms_norm_eps", "must be > 0")
        _check(self.hidden_act == "silu", f"{key}.hidden_act",
               f"only 'silu' (Qwen2) is supported, got {self.hidden_act!r}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelArch":
        """Parse a HF Qwen2 config dict (old top-level `rope_theta` or new `rope_parameters`)."""
        arch = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2") or (arch and not any("Qwen2" in a for a in arch)):
            raise ConfigError(f"{source}: unsupported architecture model_type={model_type!r} "
                              f"architectures={arch!r}; only Qwen2/Qwen2.5 is supported")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen2.5 "
                              "checkpoints ship it off; full attention only)")
        rope_theta = d.get("rope_theta")
        rp = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rp, dict):
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype not in ("default", None):
                raise ConfigError(f"{source}: rope_type {rtype!r} is not supported (only default)")
            if rope_theta is None:
                rope_theta = rp.get("rope_theta")
        if rope_theta is None:
            rope_theta = 10000.0
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            attention_bias=True,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            hidden_act=d.get("hidden_act", "silu"),
        )
        a = cls(**kw)
        a.validate(source)
        return a

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A HF `config.json` dict that transformers loads as Qwen2ForCausalLM."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "use_cache": True,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }


DTYPES = ("float32", "bfloat16", "float16")


#: attention kernels of the no-cache (train / scoring) passes (models/attention.py,
#: `no_cache_kernel`): "auto" = "splash" on TPU, the "cudnn" path on NVIDIA GPUs in 16-bit,
#: else our blocked flash attention; "cudnn" = the fused kernel on rows that are one
#: contiguous run of real tokens (cuDNN in 16-bit on GPU, XLA otherwise); "plain" = our flash
#: attention (the full softmax for sequences of ≤ 64 tokens); "xla" = XLA's full masked
#: softmax; "splash" = JAX's
#: Pallas splash-attention kernel (what "auto" picks on TPU; elsewhere Pallas' interpret
#: mode: exact but slow, for tests)
ATTENTION = ("auto", "xla", "plain", "cudnn", "splash")
#: `model.remat`: what the backward pass recomputes of each decoder layer. "none" keeps every
#: activation, "full" recomputes them all (jax.checkpoint saving nothing), the others are
#: jax.checkpoint_policies that keep the matmul outputs; true/false mean full/none
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy_name(value: Any, key: str = "model.remat") -> str:
    """The REMAT name of a remat setting (a name, or a boolean: true → full, false → none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT:
        raise ConfigError(f"{key}: {value!r} is not one of {list(REMAT)} (or true/false)")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Where the policy comes from and how it computes."""

    path: Optional[str] = None  # HF directory or Orbax checkpoint; None → random init from arch
    preset: Optional[str] = None  # name in configs/models/ (e.g. "qwen2.5-0.5b") for random init
    arch: Optional[ModelArch] = None  # explicit architecture (used when path and preset are None)
    tokenizer: Optional[str] = None  # tokenizer dir; None → model path, else the packaged Qwen2.5 one
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: Union[bool, str] = "none"  # REMAT policy of each decoder layer (true = full)
    attention: Literal["auto", "xla", "plain", "cudnn", "splash"] = "auto"
    seed: int = 0  # random-init seed
    # decoder parameters stacked along a `layers` axis and run by one lax.scan: the compiled
    # programs hold one layer whatever the depth (compile time flat in depth); stacks of at
    # most qwen2.UNROLL_MAX_LAYERS layers are unrolled (the loop made the tiny no-remat train
    # step slower on CPU). False: an nnx.List of layers, unrolled in every program
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy_name(self.remat))

    def validate(self, key: str = "model") -> None:
        _check(self.param_dtype in DTYPES, f"{key}.param_dtype", f"must be one of {DTYPES}")
        _check(self.compute_dtype in DTYPES, f"{key}.compute_dtype", f"must be one of {DTYPES}")
        _check(self.attention in ATTENTION, f"{key}.attention", f"must be one of {ATTENTION}")
        if self.arch is not None:
            self.arch.validate(f"{key}.arch")


# --------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means 'all remaining devices' (at most one axis)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # entries replacing those of mesh.LOGICAL_RULES: logical axis → mesh axis, list of mesh
    # axes or null (replicated), e.g. {length: tensor, mlp: null} for sequence parallelism
    rules: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str = "mesh") -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for k, v in sizes.items():
            _check(v == -1 or v >= 1, f"{key}.{k}", f"must be -1 or >= 1, got {v}")
        _check(list(sizes.values()).count(-1) <= 1, key,
               "at most one axis may be -1 (the remaining devices)")
        from flowrl_jax.mesh import LOGICAL_RULES, MESH_AXES  # the table lives with the mesh

        for name, target in self.rules.items():
            _check(name in LOGICAL_RULES, f"{key}.rules.{name}",
                   f"unknown logical axis (known: {', '.join(sorted(n for n in LOGICAL_RULES if n))})")
            axes = [] if target is None else [target] if isinstance(target, str) else target
            _check(isinstance(axes, (list, tuple)) and all(a in MESH_AXES for a in axes),
                   f"{key}.rules.{name}",
                   f"must be null, a mesh axis or a list of them ({', '.join(MESH_AXES)}), "
                   f"got {target!r}")

    def __hash__(self) -> int:  # the rules dict is not hashable; it is part of equality
        return hash((self.data, self.fsdp, self.tensor, repr(sorted(self.rules.items(), key=str))))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DatasetSpec:
    """A user data set: a file (or `datasets` save_to_disk folder) and a field mapping."""

    name: str = ""
    path: str = ""
    # jsonl | json | parquet | hf_dataset (a save_to_disk folder); None → from the path
    format: Optional[str] = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # gold answer (math) or tests (code); dotted paths allowed
    id_field: Optional[str] = None
    data_source: str = "math_dapo"  # reward registry key
    template: Literal["math", "code", "none"] = "math"
    # how the gold answer is read from `answer_field`: as is, the last \boxed{} of a
    # solution, or the text after "####" (GSM8K style)
    answer_extract: Literal["none", "last_boxed", "after_hashes"] = "none"
    starter_code_field: Optional[str] = None  # code sets: field with a starter-code stub


@dataclass(frozen=True)
class DataConfig:
    """Training prompts: named shipped data sets and/or user data sets."""

    train: tuple[str, ...] = ("dapo_math_17k",)
    custom: tuple[DatasetSpec, ...] = ()
    # root of the named data sets; None → $FLOWRL_DATA_DIR, else the copy inside the package
    data_dir: Optional[str] = None
    template: Literal["math", "code", "none", "auto"] = "auto"
    chat_template: bool = True
    max_prompt_length: int = 2048
    truncation: Literal["left", "filter"] = "left"
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = None  # None → repeat forever
    worker_count: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)

    def validate(self, key: str = "data") -> None:
        _check(self.max_prompt_length > 0, f"{key}.max_prompt_length", "must be > 0")
        _check(self.worker_count >= 0, f"{key}.worker_count", "must be >= 0")
        _check(self.num_epochs is None or self.num_epochs > 0, f"{key}.num_epochs", "must be > 0")
        _check(list(self.length_buckets) == sorted(self.length_buckets) and
               all(b > 0 for b in self.length_buckets), f"{key}.length_buckets",
               "must be positive and increasing")


# --------------------------------------------------------------------------- rollout


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
        _check(self.prompts_per_step > 0, f"{key}.prompts_per_step", "must be > 0")
        _check(self.samples_per_prompt > 0, f"{key}.samples_per_prompt", "must be > 0")
        _check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        _check(self.temperature > 0, f"{key}.temperature",
               "must be > 0 for RL rollouts (log-probs are taken at this temperature)")
        _check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, f"{key}.top_k", "must be >= 0 (0 = off)")
        _check(0 <= self.min_p < 1, f"{key}.min_p", "must be in [0, 1)")
        _check(self.decode_slots > 0, f"{key}.decode_slots", "must be > 0")
        _check(self.decode_chunk > 0, f"{key}.decode_chunk", "must be > 0")
        _check(self.backend in ("engine", "jetstream"), f"{key}.backend",
               f"must be 'engine' or 'jetstream', got {self.backend!r}")
        _check(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _check(self.kv_cache in ("paged", "dense"), f"{key}.kv_cache", "must be paged or dense")
        _check(self.page_size > 0, f"{key}.page_size", "must be > 0")
        _check(self.kv_cache_gib is None or self.kv_cache_gib > 0, f"{key}.kv_cache_gib",
               "must be > 0 (or null: a share of free device memory)")
        _check(self.paged_attention in ("auto", "xla", "pallas"), f"{key}.paged_attention",
               "must be auto, xla or pallas")
        d = self.devices
        _check(d is None or (isinstance(d, int) and d >= 1) or (isinstance(d, float) and 0 < d < 1),
               f"{key}.devices", f"must be a device count >= 1 or a fraction in (0, 1), got {d!r}")
        for i, server in enumerate(self.servers):
            host, sep, port = server.rpartition(":")
            _check(bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536),
                   f"{key}.servers[{i}]", f"must be host:port, got {server!r}")
        _check(len(set(self.servers)) == len(self.servers), f"{key}.servers",
               f"lists a server twice: {list(self.servers)}")
        if self.servers:  # they replace the in-process sampler (rollout.backend is unused)
            _check(self.devices is None, f"{key}.servers",
                   "remote servers replace the sampler's own devices; unset rollout.devices")


# --------------------------------------------------------------------------- algorithm


@dataclass(frozen=True)
class AlgoConfig:
    """Loss selection and hyper-parameters (SPEC §1–§4)."""

    name: str = "flowrl"  # a registered algorithm: flowrl, grpo, ppo, reinforce_pp, or your own
    # FlowRL
    beta: float = 15.0
    # The reward inside FlowRL's δ: "group" = r̂, group-normalised (SPEC §3, the paper);
    # "none" = the raw reward r, so the fixed point is exactly π_ref·exp(β r) (the demo).
    reward_norm: Literal["group", "none"] = "group"
    is_clip: Literal["paper", "cap", "asym", "none"] = "cap"
    is_cap: float = 10.0
    log_w_clamp: float = 20.0  # |log w| clamp before exp (overflow guard)
    # importance weight w of the TB loss: "clipped" = exp(Σ log-ratio) through `is_clip`;
    # "one" = w ≡ 1 (the paper's "w/o importance sampling" ablation; not is_clip: none)
    importance_weight: Literal["clipped", "one"] = "clipped"
    # log Z in δ: "network" = Z_φ(x) (SPEC §2); "zero" = log Z ≡ 0, no Z-network;
    # "scalar" = one learned scalar shared by all prompts (ablations)
    log_z: Literal["network", "zero", "scalar"] = "network"
    # true: δ uses the per-token means of log πθ and log π_ref (the paper); false: their sums
    length_norm: bool = True
    # hidden blocks [Linear → GELU → LayerNorm → Dropout] before the Linear(H→1) head; the
    # paper's "3-layer MLP" (official num_layers = 3) is z_depth 2
    z_depth: int = 2
    z_dropout: float = 0.1
    detach_z_input: bool = False
    # prompt tokens Z_φ averages: all, or all but the last (the official code's slice)
    z_pool: Literal["prompt", "prompt_but_last"] = "prompt_but_last"
    # clipped surrogate (GRPO / PPO / REINFORCE++; FlowRL `paper`/`asym` reuse eps)
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28
    # GRPO KL-to-ref loss
    use_kl_loss: bool = False
    kl_coef: float = 0.001
    # PPO
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float = 0.2
    vf_coef: float = 1.0
    critic_lr: float = 1e-5
    critic_weight_decay: Optional[float] = None  # AdamW decay of the critic; None → optimizer's
    # "head": a value head on the policy trunk (shares its gradient and clip budget);
    # "model": a separate copy of the policy architecture initialised from the same
    # checkpoint, with a value head, its own AdamW (critic_lr) and grad-norm clip (veRL's)
    critic: Literal["head", "model"] = "head"
    critic_grad_clip: float = 1.0  # the separate critic's own global-norm clip (critic: model)
    # REINFORCE++
    kl_penalty_coef: float = 0.0
    kl_penalty_type: Literal["k1", "k2", "k3"] = "k1"  # in-reward KL estimator (PPO / REINFORCE++)
    # shared by the clipped-surrogate losses (algos/policy_gradient.py)
    kl_loss_type: Literal["k1", "k2", "k3"] = "k3"  # GRPO KL-to-ref loss estimator
    surrogate_clip_high: Optional[float] = None  # PPO-surrogate upper ε; None → clip_eps
    dual_clip_c: Optional[float] = None  # dual-clip PPO bound for A < 0 (e.g. 3.0); None → off
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"

    def validate(self, key: str = "algo") -> None:
        from flowrl_jax.algos import list_algorithms  # the registry is the list of valid names

        known = list_algorithms()
        _check(self.name in known, f"{key}.name", f"unknown algorithm {self.name!r} (known: "
               f"{', '.join(known)})")
        _check(self.beta > 0, f"{key}.beta", "must be > 0")
        _check(self.surrogate_clip_high is None or self.surrogate_clip_high > 0,
               f"{key}.surrogate_clip_high", "must be > 0")
        _check(self.dual_clip_c is None or self.dual_clip_c > 1, f"{key}.dual_clip_c",
               "must be > 1")
        _check(self.vf_coef >= 0, f"{key}.vf_coef", "must be >= 0")
        _check(self.value_clip > 0, f"{key}.value_clip", "must be > 0")
        _check(self.kl_penalty_coef >= 0, f"{key}.kl_penalty_coef", "must be >= 0")
        _check(self.is_cap > 0, f"{key}.is_cap", "must be > 0")
        _check(self.log_w_clamp > 0, f"{key}.log_w_clamp", "must be > 0")
        _check(self.z_depth >= 0, f"{key}.z_depth", "must be >= 0")
        _check(0 <= self.z_dropout < 1, f"{key}.z_dropout", "must be in [0, 1)")
        _check(0 < self.clip_eps < 1, f"{key}.clip_eps", "must be in (0, 1)")
        _check(self.clip_eps_high > 0, f"{key}.clip_eps_high", "must be > 0")
        _check(0 <= self.gamma <= 1, f"{key}.gamma", "must be in [0, 1]")
        _check(0 <= self.lam <= 1, f"{key}.lam", "must be in [0, 1]")
        _check(self.kl_coef >= 0, f"{key}.kl_coef", "must be >= 0")
        _check(self.critic_lr > 0, f"{key}.critic_lr", "must be > 0")
        _check(self.critic_weight_decay is None or self.critic_weight_decay >= 0,
               f"{key}.critic_weight_decay", "must be >= 0")
        _check(self.critic_grad_clip > 0, f"{key}.critic_grad_clip", "must be > 0")


# --------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then constant learning rate, global-norm clipping.

    `warmup_unit` says what `warmup_steps` counts (rl/train_state.py, `lr_scale`):
    "update" = optimizer updates, lr · min(1, (k + 1) / warmup_steps) at update k (full lr
    within the first rollout step); "rollout_step" = rollout steps as the official runs
    (torch's constant-with-warm-up scheduler stepped once per rollout step):
    lr · min(1, s / warmup_steps) for every update of rollout step s, so 0 in step 0.
    """

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    warmup_unit: Literal["update", "rollout_step"] = "update"
    grad_clip: float = 1.0
    z_lr: Optional[float] = None  # None → Z-network in the policy's optimizer at `lr`

    def validate(self, key: str = "optimizer") -> None:
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(0 <= self.b1 < 1, f"{key}.b1", "must be in [0, 1)")
        _check(0 <= self.b2 < 1, f"{key}.b2", "must be in [0, 1)")
        _check(self.eps > 0, f"{key}.eps", "must be > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
        _check(self.z_lr is None or self.z_lr > 0, f"{key}.z_lr", "must be > 0")


# --------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class TrainerConfig:
    """The RL loop: sizes of batches, epochs, checkpoints, logging."""

    steps: int = 200  # rollout steps
    mini_batch_size: int = 256  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per accumulation step inside the jitted step
    logprob_micro_batch_size: int = 16
    epochs: int = 1  # passes over each rollout batch
    checkpoint_every: int = 10
    keep_last: int = 3
    keep_every: Optional[int] = None  # also keep every k-th step permanently
    log_every: int = 1
    # where metrics go: metrics.jsonl (always: the run's record, resumed from the checkpoint),
    # TensorBoard (OUT/tb), Weights & Biases (the `wandb` extra; WANDB_MODE, WANDB_DIR apply)
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl", "tensorboard")
    wandb_project: str = "flowrl-jax"  # the W&B project of `wandb` (the run is named after OUT)
    validate_every: int = 0  # 0 = off
    export_hf: bool = False  # write the final policy in HF format to OUT/hf
    ref_offload: bool = False  # keep reference params on host memory
    logprob_chunk: int = 1024  # sequence chunk for the chunked log-prob computation
    device_memory_gb: Optional[float] = None  # per-device budget for the memory check; None → detect
    # "grain": the Grain rollout pipeline (rl/rollout_pipeline.py); "numpy": the pre-pipeline
    # path (a thread scores, NumPy cuts mini-batches), kept to check the two stay bit-identical
    rollout_pipeline: Literal["grain", "numpy"] = "grain"
    reward_threads: Optional[int] = None  # samples scored at once by the pipeline; None → CPUs
    # bounded staleness k: the rollouts of steps s+1..s+k are generated (by policy versions
    # at most k updates old) while step s trains; 0 = on-policy, strictly in turn
    staleness: int = 0

    def validate(self, key: str = "trainer") -> None:
        _check(self.steps >= 0, f"{key}.steps", "must be >= 0")
        _check(self.mini_batch_size > 0, f"{key}.mini_batch_size", "must be > 0")
        _check(self.micro_batch_size > 0, f"{key}.micro_batch_size", "must be > 0")
        _check(self.mini_batch_size % self.micro_batch_size == 0, f"{key}.micro_batch_size",
               f"must divide mini_batch_size ({self.mini_batch_size})")
        _check(self.logprob_micro_batch_size > 0, f"{key}.logprob_micro_batch_size", "must be > 0")
        _check(self.epochs > 0, f"{key}.epochs", "must be > 0")
        _check(self.checkpoint_every > 0, f"{key}.checkpoint_every", "must be > 0")
        _check(self.keep_last > 0, f"{key}.keep_last", "must be > 0")
        _check(self.keep_every is None or self.keep_every > 0, f"{key}.keep_every", "must be > 0")
        _check(self.log_every > 0, f"{key}.log_every", "must be > 0")
        _check("jsonl" in self.loggers, f"{key}.loggers",
               f"must include jsonl (metrics.jsonl is the run's record), got {list(self.loggers)}")
        _check(len(set(self.loggers)) == len(self.loggers), f"{key}.loggers",
               f"lists a logger twice: {list(self.loggers)}")
        # third-party package, not the project's own module: is it installed at all?
        _check("wandb" not in self.loggers or importlib.util.find_spec("wandb") is not None,
               f"{key}.loggers", "lists wandb but the wandb package is not installed "
               "(pip install 'flowrl-jax[wandb]')")
        _check(self.validate_every >= 0, f"{key}.validate_every", "must be >= 0")
        _check(self.logprob_chunk > 0, f"{key}.logprob_chunk", "must be > 0")
        _check(self.device_memory_gb is None or self.device_memory_gb > 0,
               f"{key}.device_memory_gb", "must be > 0")
        _check(self.rollout_pipeline in ("grain", "numpy"), f"{key}.rollout_pipeline",
               f"must be 'grain' or 'numpy', got {self.rollout_pipeline!r}")
        _check(self.reward_threads is None or self.reward_threads > 0, f"{key}.reward_threads",
               "must be > 0")
        _check(isinstance(self.staleness, int) and self.staleness >= 0, f"{key}.staleness",
               f"must be an integer >= 0 (0 = on-policy), got {self.staleness!r}")


# --------------------------------------------------------------------------- eval


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
        _check(self.n > 0, f"{key}.n", "must be > 0")
        _check(self.temperature >= 0, f"{key}.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        _check(self.limit is None or self.limit > 0, f"{key}.limit", "must be > 0")


# --------------------------------------------------------------------------- rewards


@dataclass(frozen=True)
class SandboxSettings:
    """How code rewards run untrusted programs."""

    # required: refuse to run code rewards when no isolating backend (namespaces as root,
    # bubblewrap) works here; best_effort: run them unisolated then (rlimits only), warned once
    isolation: Literal["required", "best_effort"] = "required"


@dataclass(frozen=True)
class RewardsConfig:
    """Reward scoring settings."""

    sandbox: SandboxSettings = field(default_factory=SandboxSettings)


# --------------------------------------------------------------------------- top level


@dataclass(frozen=True)
class Config:
    """The whole run."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    task: dict[str, Any] = field(default_factory=dict)  # free-form options of a task (demo)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        _check(self.trainer.mini_batch_size <= self.rollout.prompts_per_step *
               self.rollout.samples_per_prompt, "trainer.mini_batch_size",
               "is larger than the rollout batch (prompts_per_step × samples_per_prompt)")


# --------------------------------------------------------------------------- loading

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless; else ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                          f"{[getattr(a, '__name__', str(a)) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis and isinstance(value, (str, int, float)):
                value = [value]  # a single item where a list is expected
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate `cls` from a mapping, type-checking each field; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("task",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, or relative to the packaged configs/ directory."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file {str(path)!r} not found (also looked in {CONFIG_DIR})")


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict[str, Any]:
    """Read a YAML config file and merge its `include:` files (depth first, file wins)."""
    p = resolve_config_path(path).resolve()
    if p in _seen:
        raise ConfigError(f"{p}: include cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = (p.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        if not inc_path.exists():
            inc_path = resolve_config_path(inc)
        merged = _deep_merge(merged, load_yaml_tree(inc_path, _seen + (p,)))
    return _deep_merge(merged, data)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    tree = dict(tree)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {ov!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def _resolve_model_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """Fill `model.arch` from `model.preset` (configs/models/<preset>.yaml) when arch is absent."""
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("preset") or model.get("arch"):
        return tree
    tree = dict(tree)
    tree["model"] = dict(model, arch=preset_tree(model["preset"]))
    return tree


def preset_tree(preset: str, key: str = "model.preset") -> dict[str, Any]:
    """The architecture mapping of configs/models/<preset>.yaml; unknown names list the known."""
    p = CONFIG_DIR / "models" / f"{preset}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in (CONFIG_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"{key}: unknown preset {preset!r} (known: {', '.join(known)})")
    return yaml.safe_load(p.read_text()) or {}


def preset_arch(preset: str, key: str = "model.preset") -> ModelArch:
    """A validated `ModelArch` from configs/models/<preset>.yaml."""
    arch = ModelArch(**preset_tree(preset, key))
    arch.validate(key)
    return arch


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a nested mapping."""
    tree = _resolve_model_preset(tree)
    cfg = build_dataclass(Config, tree)
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with includes) and dotted overrides into a validated `Config`."""
    tree = load_yaml_tree(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides or []))
    return config_from_dict(tree)


def config_to_dict(cfg: Any) -> Any:
    """A plain nested dict/list version of a config (for saving next to a run)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)
