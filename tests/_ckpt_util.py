"""Tiny random HF Qwen2 checkpoints for the checkpoint/parity tests (real save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def make_hf(out: Path, *, tie: bool = True, kv: int = 2, theta: float = 10000.0, heads: int = 4,
            vocab: int = 128, hidden: int = 64, inter: int = 128, layers: int = 2, seed: int = 0,
            max_shard_size: str | None = None) -> tuple[Path, Qwen2ForCausalLM]:
    """Save a random tiny Qwen2 (non-trivial norms and q/k/v biases) to `out`; return it too."""
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      tie_word_embeddings=tie, rope_theta=theta, max_position_embeddings=256,
                      initializer_range=0.08, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return Path(out), model


def hf_logits(model: Qwen2ForCausalLM, ids: np.ndarray) -> np.ndarray:
    """float32 logits of a HF model for int ids [B, T] (no padding)."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@jax.jit
def _forward(model, ids):
    return model(ids).logits


def jax_logits(model, ids: np.ndarray) -> np.ndarray:
    """Logits of our model through one shared jit (compiled once per model structure)."""
    return np.asarray(_forward(model, jnp.asarray(ids)))
