"""Size arithmetic of a Qwen2 architecture (no JAX: usable before any backend starts)."""

from __future__ import annotations

from flowrl_jax.config import ModelArch


def param_count(arch: ModelArch) -> int:
    """Parameters of a Qwen2 architecture (embeddings, attention with biases, MLP, norms)."""
    h, i, L, v = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.vocab_size
    hd = arch.resolved_head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if arch.attention_bias else 0)
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    emb = v * h * (1 if arch.tie_word_embeddings else 2)
    return L * per_layer + emb + h
