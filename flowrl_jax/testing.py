"""Helpers for tests and benchmarks: tiny Qwen2 models with peaked logits, their Hugging Face
PyTorch twins, and a tiny word-level tokenizer (no downloads). Top-level, not in sampling/:
it builds HF twins through checkpoint/, which the sampler never imports."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowrl_jax.config import ModelArch
from flowrl_jax.models.qwen2 import Numerics, Qwen2ForCausalLM, build_model, with_layer_form


def tiny_arch(vocab_size: int = 128, **kw: Any) -> ModelArch:
    """vocab ≤ 128, hidden 64, 2 layers, GQA 4 heads / 2 kv heads."""
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    base.update(kw)
    return ModelArch(**base)


def tiny_model(arch: ModelArch, seed: int = 0, scale: float = 10.0,
               num: Optional[Numerics] = None) -> Qwen2ForCausalLM:
    """A random model whose weights are `scale`× the default init and biases random, so
    logits are peaked (greedy ties and near-uniform distributions make weak tests). The same
    weights in either layer form (`num.scan_layers`): built unrolled, then stacked."""
    num = num or Numerics()
    model = build_model(arch, dataclasses.replace(num, scan_layers=False), seed)
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def rescale(x):
        if x.ndim == 2:
            return x * scale if scale != 1.0 else x  # no second copy of a large model
        if x.ndim == 1 and bool(jnp.all(x == 0)):  # q/k/v biases
            return jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
        return x

    nnx.update(model, jax.tree.map(rescale, state))
    return with_layer_form(model, num.scan_layers)


def to_hf(model: Qwen2ForCausalLM, arch: ModelArch) -> Any:
    """The same weights in a transformers Qwen2ForCausalLM (float32, eval mode)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM as HFQwen2

    d = arch.to_hf_dict()
    for k in ("architectures", "torch_dtype", "dtype", "rope_parameters"):
        d.pop(k, None)
    hf = HFQwen2(Qwen2Config(**d)).float().eval()

    from flowrl_jax.checkpoint.hf import hf_tensors

    sd = {name: torch.tensor(np.asarray(arr, np.float32)) for name, arr in hf_tensors(model)}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise RuntimeError(f"HF conversion mismatch: missing={missing} unexpected={unexpected}")
    if arch.tie_word_embeddings:
        hf.tie_weights()
    return hf


def word_tokenizer(vocab_size: int = 64) -> Any:
    """A whitespace word-level PreTrainedTokenizerFast: ids 0 <pad>, 1 <eos>, 2 <unk>, 3.. w0.."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_hf_dir(model: Qwen2ForCausalLM, arch: ModelArch, out: str, tokenizer: Any = None) -> str:
    """Write a HF directory (config.json + safetensors, and the tokenizer when given)."""
    to_hf(model, arch).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
