"""Z_φ, FlowRL's learned log-partition function (SPEC §2).

Input: the policy's final hidden states (after the final RMSNorm) of the prompt tokens,
taken from the same forward pass that gives the token log-probs, averaged over the valid
(non-padding) prompt tokens; with `algo.z_pool: prompt_but_last` (default, the official
code's `[:, :-response_length-1]` slice) the last prompt token is left out (rl/forward.py).
Network: `depth` × [Linear(H→H) → GELU → LayerNorm(H) → Dropout(p)] then Linear(H→1); the
scalar output is log Z(x) directly. `depth` (`algo.z_depth`) counts the hidden blocks, not
the Linear layers: the paper's "3-layer MLP" (official `ProjZModule(num_layers=3)`) is
depth 2 (three Linear layers in all). Linear weights and biases start as torch.nn.Linear's
do, U(±1/√fan_in); LayerNorm as torch's (scale 1, bias 0).

`ZScalar` is the `algo.log_z: scalar` ablation: one learned log Z shared by every prompt
(starts at 0), called like ZNet.

Gradient flows from log Z back into the transformer unless `detach_input` (the
`algo.detach_z_input` ablation), which puts a stop_gradient on the pooled input.
Z_φ always computes in float32 (it is tiny next to the policy) and is never exported with
the policy. Dropout is explicit: active only with `deterministic=False` and a PRNG key.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# torch.nn.Linear's default init (kaiming_uniform, a=√5) ≡ U(±1/√fan_in): variance 1/(3·fan_in)
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(key: Array, fan_in: int, d_out: int) -> Array:
    """torch.nn.Linear's default bias: U(−1/√fan_in, 1/√fan_in), float32 [d_out]."""
    bound = 1.0 / float(fan_in) ** 0.5
    return jax.random.uniform(key, (d_out,), jnp.float32, -bound, bound)


class ZLinear(nnx.Module):
    """y = x @ W + b in float32; W [in, out] annotated with logical axes; torch's init."""

    def __init__(self, d_in: int, d_out: int, axes: tuple, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (d_in, d_out), jnp.float32),
                                logical_axes=axes)
        self.bias = nnx.Param(torch_bias_init(rngs.params(), d_in, d_out),
                              logical_axes=(axes[1],))

    def __call__(self, x: Array) -> Array:
        return jnp.dot(x, self.kernel[...]) + self.bias[...]


class ZLayerNorm(nnx.Module):
    """LayerNorm over the last axis with learned scale and bias (eps 1e-5, as torch)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("z_hidden",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("z_hidden",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class ZBlock(nnx.Module):
    """Linear(H→H) → GELU → LayerNorm(H) → Dropout(p)."""

    def __init__(self, hidden: int, dropout: float, *, rngs: nnx.Rngs):
        self.linear = ZLinear(hidden, hidden, ("z_hidden", "z_hidden"), rngs=rngs)
        self.norm = ZLayerNorm(hidden)
        self.dropout = nnx.Dropout(dropout)  # no stored rngs: the key comes with each call

    def __call__(self, x: Array, deterministic: bool, key: Optional[Array]) -> Array:
        x = self.norm(jax.nn.gelu(self.linear(x), approximate=False))
        return self.dropout(x, deterministic=deterministic, rngs=key)


def masked_mean_pool(hidden: Array, mask: Array) -> Array:
    """Mean of hidden [B, P, H] over positions where mask [B, P] is set, in float32 → [B, H].

    Padded positions are selected away (not multiplied), so NaN/inf there cannot leak; a
    row with no valid position pools to 0.
    """
    m = jnp.asarray(mask).astype(bool)
    h = jnp.where(m[..., None], hidden.astype(jnp.float32), 0.0)
    n = jnp.sum(m.astype(jnp.float32), axis=-1, keepdims=True)
    return jnp.sum(h, axis=1) / jnp.maximum(n, 1.0)


class ZNet(nnx.Module):
    """log Z_φ(x) from the prompt's final hidden states (SPEC §2)."""

    def __init__(self, hidden_size: int, depth: int = 2, dropout: float = 0.1,
                 detach_input: bool = False, *, rngs: nnx.Rngs):
        if depth < 0:
            raise ValueError(f"algo.z_depth must be >= 0, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"algo.z_dropout must be in [0, 1), got {dropout}")
        self.blocks = nnx.List([ZBlock(hidden_size, dropout, rngs=rngs) for _ in range(depth)])
        self.head = ZLinear(hidden_size, 1, ("z_hidden", None), rngs=rngs)
        self.detach_input = detach_input

    def __call__(self, prompt_hidden: Array, prompt_mask: Array, *, deterministic: bool = True,
                 key: Optional[Array] = None) -> Array:
        """log Z [B] from prompt hidden states [B, P, H] and the valid-prompt mask [B, P]."""
        if prompt_hidden.ndim != 3 or prompt_mask.shape != prompt_hidden.shape[:2]:
            raise ValueError(f"ZNet: prompt_hidden must be [B, P, H] and prompt_mask [B, P]; got "
                             f"{prompt_hidden.shape} and {prompt_mask.shape}")
        if not deterministic and key is None and len(self.blocks) and self.blocks[0].dropout.rate > 0:
            raise ValueError("ZNet: training mode (deterministic=False) needs a dropout `key`")
        x = masked_mean_pool(prompt_hidden, prompt_mask)
        if self.detach_input:
            x = jax.lax.stop_gradient(x)
        for i, block in enumerate(self.blocks):
            x = block(x, deterministic, None if key is None else jax.random.fold_in(key, i))
        return self.head(x)[:, 0]


class ZScalar(nnx.Module):
    """log Z as one learned scalar shared by all prompts (`algo.log_z: scalar`), starting at 0."""

    def __init__(self):
        self.value = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, prompt_hidden: Array, prompt_mask: Array, *, deterministic: bool = True,
                 key: Optional[Array] = None) -> Array:
        """The scalar broadcast to [B] (the prompt is not read: no gradient reaches the policy)."""
        return jnp.broadcast_to(self.value[...], prompt_hidden.shape[:1])


def build_znet(hidden_size: int, algo_cfg, seed: int = 0) -> ZNet:
    """A randomly initialised Z_φ from an AlgoConfig (z_depth, z_dropout, detach_z_input)."""
    with nnx.use_eager_sharding(False):
        return ZNet(hidden_size, algo_cfg.z_depth, algo_cfg.z_dropout, algo_cfg.detach_z_input,
                    rngs=nnx.Rngs(seed))
