"""`model` and `mesh`: where the policy comes from, how it computes and how it is sharded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from flowrl_jax.config.arch import ModelArch
from flowrl_jax.config.check import check
from flowrl_jax.errors import ConfigError

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
        check(self.param_dtype in DTYPES, f"{key}.param_dtype", f"must be one of {DTYPES}")
        check(self.compute_dtype in DTYPES, f"{key}.compute_dtype", f"must be one of {DTYPES}")
        check(self.attention in ATTENTION, f"{key}.attention", f"must be one of {ATTENTION}")
        if self.arch is not None:
            self.arch.validate(f"{key}.arch")


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
            check(v == -1 or v >= 1, f"{key}.{k}", f"must be -1 or >= 1, got {v}")
        check(list(sizes.values()).count(-1) <= 1, key,
              "at most one axis may be -1 (the remaining devices)")
        from flowrl_jax.mesh import LOGICAL_RULES, MESH_AXES  # the table lives with the mesh

        for name, target in self.rules.items():
            check(name in LOGICAL_RULES, f"{key}.rules.{name}",
                  f"unknown logical axis (known: {', '.join(sorted(n for n in LOGICAL_RULES if n))})")
            axes = [] if target is None else [target] if isinstance(target, str) else target
            check(isinstance(axes, (list, tuple)) and all(a in MESH_AXES for a in axes),
                  f"{key}.rules.{name}",
                  f"must be null, a mesh axis or a list of them ({', '.join(MESH_AXES)}), "
                  f"got {target!r}")

    def __hash__(self) -> int:  # the rules dict is not hashable; it is part of equality
        return hash((self.data, self.fsdp, self.tensor, repr(sorted(self.rules.items(), key=str))))
