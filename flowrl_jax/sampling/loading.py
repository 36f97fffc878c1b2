"""Model + tokenizer loading for the sample/serve commands.

Uses `flowrl_jax.models.loading.load_model` (HF directories and Orbax checkpoints) when it
exists; otherwise a small built-in reader of HF safetensors directories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flowrl_jax.config import ModelArch, ModelConfig
from flowrl_jax.models.qwen2 import Numerics, Qwen2ForCausalLM, build_model


def _read_hf_dir(path: Path, model_cfg: ModelConfig) -> tuple[Qwen2ForCausalLM, ModelArch]:
    """Load a HF Qwen2 directory (config.json + *.safetensors) into an unsharded NNX model."""
    from safetensors.numpy import load_file

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    arch = ModelArch.from_hf_dict(json.loads(cfg_file.read_text()), str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weight files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    model = build_model(arch, Numerics.from_config(model_cfg))
    pdt = jnp.dtype(model_cfg.param_dtype)
    used: set[str] = set()

    def put(var: Any, name: str, transpose: bool = False) -> None:
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} is missing from the safetensors files")
        x = tensors[name].astype(np.float32)
        x = x.T if transpose else x
        if x.shape != var[...].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {x.shape}, expected "
                             f"{var[...].shape}")
        var[...] = jnp.asarray(x, pdt)
        used.add(name)

    put(model.embed_tokens, "model.embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, n)
            put(lin.kernel, f"{p}self_attn.{n}.weight", transpose=True)
            if lin.bias is not None:
                put(lin.bias, f"{p}self_attn.{n}.bias")
        for n in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(layer.mlp, n).kernel, f"{p}mlp.{n}.weight", transpose=True)
        put(layer.input_layernorm.weight, f"{p}input_layernorm.weight")
        put(layer.post_attention_layernorm.weight, f"{p}post_attention_layernorm.weight")
    put(model.norm.weight, "model.norm.weight")
    if model.lm_head is not None:
        put(model.lm_head.kernel, "lm_head.weight", transpose=True)
    return model, arch


def load_for_sampling(path: str, mesh: Any = None, model_cfg: Optional[ModelConfig] = None
                      ) -> tuple[Qwen2ForCausalLM, ModelArch, Optional[str]]:
    """(model, arch, tokenizer_dir or None) from a HF directory or an Orbax checkpoint."""
    model_cfg = model_cfg or ModelConfig(path=path)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    try:
        from flowrl_jax.models.loading import load_model  # the project's loader, when present
    except ImportError:
        load_model = None
    if load_model is not None:
        if mesh is None:
            from flowrl_jax.mesh import single_device_mesh

            mesh = single_device_mesh()
        model, arch, tok = load_model(str(p), mesh, model_cfg)
        return model, arch, (str(tok) if tok else None)
    model, arch = _read_hf_dir(p, model_cfg)
    has_tok = any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    return model, arch, (str(p) if has_tok else None)


_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer_for(tokenizer_dir: Optional[str]) -> Any:
    """The model's tokenizer, or the packaged Qwen2.5 one when the model dir has none.

    A generic `tokenizer.json` tokenizer next to a Qwen2 config.json is loaded as what it is:
    AutoTokenizer would pick Qwen2Tokenizer from the model type and re-tokenise wrongly."""
    from flowrl_jax.data.tokenizer import load_tokenizer

    if tokenizer_dir:
        d = Path(tokenizer_dir)
        cfg_file = d / "tokenizer_config.json"
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
        if cls in _GENERIC_CLASSES and (d / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(d))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
            return tok
    return load_tokenizer(tokenizer_dir)


def default_devices_note() -> str:
    """One line naming the devices generation runs on."""
    d = jax.devices()
    return f"{len(d)} × {d[0].platform}"
