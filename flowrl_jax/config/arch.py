"""`model.arch`: the Qwen2 architecture, and its conversion from and to a HF `config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flowrl_jax.config.check import check
from flowrl_jax.errors import ConfigError


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
            check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              f"{key}.num_key_value_heads",
              f"{self.num_attention_heads} attention heads are not a multiple of "
              f"{self.num_key_value_heads} key/value heads")
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, f"{key}.hidden_size",
                  "not divisible by num_attention_heads and head_dim is not given")
        check(self.rope_theta > 0, f"{key}.rope_theta", "must be > 0")
        check(self.rms_norm_eps > 0, f"{key}.rms_norm_eps", "must be > 0")
        check(self.hidden_act == "silu", f"{key}.hidden_act",
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
