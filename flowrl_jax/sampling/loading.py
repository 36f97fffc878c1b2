"""Model + tokenizer loading for the sample/serve commands.

Models load through `flowrl_jax.models.loading.load_model` (HF directories and Orbax
checkpoints); this module adds the tokenizer choice and device notes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax

from flowrl_jax.config import ModelArch, ModelConfig
from flowrl_jax.models.loading import load_model
from flowrl_jax.models.qwen2 import Qwen2ForCausalLM


def load_for_sampling(path: str, mesh: Any = None, model_cfg: Optional[ModelConfig] = None
                      ) -> tuple[Qwen2ForCausalLM, ModelArch, Optional[str]]:
    """(model, arch, tokenizer_dir or None) from a HF directory or an Orbax checkpoint."""
    model_cfg = model_cfg or ModelConfig(path=path)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    if mesh is None:
        from flowrl_jax.mesh import single_device_mesh

        mesh = single_device_mesh()
    model, arch, tok = load_model(str(p), mesh, model_cfg)
    return model, arch, (str(tok) if tok else None)


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
