"""Qwen2 / Qwen2.5 decoder in Flax NNX: GQA, RoPE, q/k/v bias, SwiGLU, RMSNorm.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from
`flowrl_jax.mesh.LOGICAL_RULES`); shardings are derived from those names, never hard-coded.
Linear weights are stored [out, in] like HF's, and attribute names mirror HF parameter
names, so checkpoint conversion is a renaming with no layout change. The decode path (KV
cache layout, prefill, one-token steps) lives in models/decode.py.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from flowrl_jax.config import ModelArch, ModelConfig, remat_policy_name
from flowrl_jax.mesh import constrain
from flowrl_jax.models.attention import (FLASH_BLOCK, contiguous_causal_attention, flash_attention,
                                         no_cache_kernel)
from flowrl_jax.models.splash import splash_attention

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    """jnp dtype from a config string."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


#: `model.remat` policies → what jax.checkpoint may keep from a layer's forward pass
#: ("full": nothing, every activation is recomputed; "none": no checkpoint at all)
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class Numerics:
    """How the model computes: parameter dtype, activation dtype, remat policy (a name of
    config.REMAT; booleans mean full / none), attention kernel, scanned layers."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: Any = "none"
    attention: str = "auto"  # auto | xla | plain | cudnn | splash
    scan_layers: bool = True  # see config.ModelConfig.scan_layers

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy_name(self.remat))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Numerics":
        return cls(dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype), cfg.remat, cfg.attention,
                   cfg.scan_layers)


# While set, parameters are built as ShapeDtypeStructs without running (or tracing) their
# initialisers: `abstract_model` of a 0.5B model then takes milliseconds instead of a second.
_ABSTRACT = contextvars.ContextVar("flowrl_abstract_params", default=False)
_NORMAL = nnx.initializers.normal(stddev=0.02)


def _param(rngs: Optional[nnx.Rngs], shape: tuple[int, ...], axes: tuple, dtype: Any,
           init: Callable | None = None) -> nnx.Param:
    """A Param with logical axes; `init(key, shape, dtype)` (default N(0, 0.02)) when concrete."""
    if _ABSTRACT.get():
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), logical_axes=axes)
    init = init or _NORMAL
    return nnx.Param(init(rngs.params() if rngs is not None else None, shape, dtype),
                     logical_axes=axes)


# Logical axes of the activations (mapped to the mesh by mesh.LOGICAL_RULES / `mesh.rules`;
# constrained only inside mesh.activation_sharding, i.e. in the train step and log-prob passes).
HIDDEN_AXES = ("batch", "length", "embed")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def _constant(value: float) -> Callable:
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def linear(x: Array, weight: Array) -> Array:
    """x [..., in] · weight [out, in]ᵀ → [..., out] (HF / PyTorch layout, no transpose op)."""
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))


class Linear(nnx.Module):
    """y = x Wᵀ (+ b) with W stored [out, in], the Hugging Face layout, so that checkpoints
    import and export without a transpose (and can alias the file's pages, see
    checkpoint/hf.py). `axes` = (in_axis, out_axis) logical names; W carries (out, in)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple, *, bias: bool, num: Numerics,
                 rngs: nnx.Rngs):
        self.weight = _param(rngs, (d_out, d_in), (axes[1], axes[0]), num.param_dtype)
        self.bias = (_param(None, (d_out,), (axes[1],), num.param_dtype, _constant(0.0))
                     if bias else None)
        self.compute_dtype = num.compute_dtype

    def __call__(self, x: Array, weight_t: Optional[Array] = None) -> Array:
        """x Wᵀ (+ b); `weight_t`: a copy of W as [in, out] in compute dtype to multiply by
        instead (the sampler's CPU decode steps make one per chunk; see decode.py)."""
        if weight_t is None:
            y = linear(x.astype(self.compute_dtype), self.weight[...].astype(self.compute_dtype))
        else:
            y = jnp.dot(x.astype(self.compute_dtype), weight_t)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 (as HF does), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float, num: Numerics):
        self.weight = _param(None, (dim,), ("norm",), num.param_dtype, _constant(1.0))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (HF 'default' RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on [B, T, heads, D]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + rot.astype(jnp.float32) * s).astype(x.dtype)


class LayerKV(NamedTuple):
    """One layer's keys and values of a forward pass: k, v [B, T, kv_heads, head_dim]."""

    k: Array
    v: Array


def attention_weights_mask(q_slots: Array, k_valid: Array) -> Array:
    """Boolean mask [B, 1, T, S]: key slot j visible to query slot i iff valid and j <= i."""
    s = k_valid.shape[1]
    causal = jnp.arange(s)[None, None, :] <= q_slots[:, :, None]  # [B, T, S]
    return (causal & k_valid[:, None, :])[:, None, :, :]


def plain_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Reference attention with GQA by repetition; q [B,T,N,D], k/v [B,S,K,D], mask [B,1,T,S]."""
    n, kh = q.shape[2], k.shape[2]
    k = jnp.repeat(k, n // kh, axis=2)
    v = jnp.repeat(v, n // kh, axis=2)
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", p, v.astype(jnp.float32)).astype(q.dtype)


def dot_attention(q: Array, k: Array, v: Array, mask: Array, impl: str) -> Array:
    """Attention through jax.nn.dot_product_attention (cuDNN/XLA), or the plain fallback."""
    if impl == "plain":
        return plain_attention(q, k, v, mask)
    kernel = None if impl in ("auto", "cudnn") else impl  # "cudnn" is for no-cache passes
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=kernel)
    except (ValueError, NotImplementedError, TypeError):
        return plain_attention(q, k, v, mask)


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and RoPE."""

    def __init__(self, arch: ModelArch, num: Numerics, rngs: nnx.Rngs):
        h, d = arch.hidden_size, arch.resolved_head_dim
        self.n_heads, self.n_kv, self.head_dim = arch.num_attention_heads, arch.num_key_value_heads, d
        bias = arch.attention_bias
        self.q_proj = Linear(h, self.n_heads * d, ("embed", "heads"), bias=bias, num=num, rngs=rngs)
        self.k_proj = Linear(h, self.n_kv * d, ("embed", "kv_heads"), bias=bias, num=num, rngs=rngs)
        self.v_proj = Linear(h, self.n_kv * d, ("embed", "kv_heads"), bias=bias, num=num, rngs=rngs)
        self.o_proj = Linear(self.n_heads * d, h, ("heads", "embed"), bias=False, num=num, rngs=rngs)
        self.impl = num.attention

    def __call__(self, x: Array, cos: Array, sin: Array, mask_info: tuple,
                 keep_kv: bool = False) -> tuple[Array, Optional[LayerKV]]:
        """Attention output and, with `keep_kv`, this pass's keys and values
        [B, T, kv_heads, D] (what a prefill stores)."""
        b, t, _ = x.shape
        q = constrain(self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim), Q_AXES)
        k = constrain(self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim), KV_AXES)
        v = constrain(self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim), KV_AXES)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # query slots are 0..T-1 (see Qwen2ForCausalLM.__call__), so the mask is
        # causal ∧ valid keys (attention.no_cache_kernel says which kernel runs)
        q_slots, k_valid = mask_info
        kv = LayerKV(k, v) if keep_kv else None
        kernel = no_cache_kernel(self.impl, q.dtype)
        if kernel == "fused":  # rows are one run each (checked where batches are placed)
            out = contiguous_causal_attention(q, k, v, k_valid)
        elif kernel == "splash":  # JAX's TPU kernel, per device under the mesh
            out = splash_attention(q, k, v, k_valid)
        elif kernel == "flash" and t > FLASH_BLOCK:  # blocked, recomputing backward
            out = flash_attention(q, k, v, k_valid)
        else:
            out = dot_attention(q, k, v, attention_weights_mask(q_slots, k_valid), self.impl)
        out = constrain(out.reshape(b, t, self.n_heads * self.head_dim), ("batch", "length", "heads"))
        return self.o_proj(out), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, arch: ModelArch, num: Numerics, rngs: nnx.Rngs):
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = Linear(h, i, ("embed", "mlp"), bias=False, num=num, rngs=rngs)
        self.up_proj = Linear(h, i, ("embed", "mlp"), bias=False, num=num, rngs=rngs)
        self.down_proj = Linear(i, h, ("mlp", "embed"), bias=False, num=num, rngs=rngs)

    def __call__(self, x: Array, weights_t: tuple = (None, None, None)) -> Array:
        """`weights_t`: optional [in, out] copies of the gate, up and down weights (Linear)."""
        g, u, d = weights_t
        hidden = constrain(jax.nn.silu(self.gate_proj(x, g)) * self.up_proj(x, u),
                           ("batch", "length", "mlp"))
        return self.down_proj(hidden, d)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, arch: ModelArch, num: Numerics, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, num)
        self.self_attn = Attention(arch, num, rngs)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, num)
        self.mlp = MLP(arch, num, rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask_info: tuple,
                 keep_kv: bool = False) -> tuple[Array, Optional[LayerKV]]:
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask_info, keep_kv)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, HIDDEN_AXES), kv


def _stack_param(vars_: list[nnx.Variable]) -> nnx.Variable:
    """One Variable holding `vars_`' values stacked along a leading `layers` axis."""
    first = vars_[0].get_value()
    if isinstance(first, jax.ShapeDtypeStruct):
        value = jax.ShapeDtypeStruct((len(vars_),) + first.shape, first.dtype)
    else:
        value = jnp.stack([v.get_value() for v in vars_])
    return vars_[0].replace(value, logical_axes=("layers",) + logical_axes(vars_[0]))


def logical_axes(var: nnx.Variable) -> tuple:
    """A Variable's `logical_axes` metadata."""
    return tuple(var.get_metadata()["logical_axes"])


def layer_slice(state: nnx.State, index: Any) -> nnx.State:
    """Layer `index` of a stacked layer state (each value's leading axis indexed, the
    `layers` logical axis dropped)."""
    return nnx.from_flat_state([(path, var.replace(var.get_value()[index],
                                                   logical_axes=logical_axes(var)[1:]))
                                for path, var in nnx.to_flat_state(state)])


class DecoderStack(nnx.Module):
    """The decoder layers as one `DecoderLayer` (`stacked`) whose parameters carry a leading
    `layers` axis, run by one `jax.lax.scan` (`Qwen2ForCausalLM.__call__`): the compiled
    program holds a single layer body whatever the depth (above UNROLL_MAX_LAYERS; shallower
    stacks are unrolled). `stack[i]` is layer i as a plain
    `DecoderLayer` (read-only slices: what the decode step and tests use)."""

    def __init__(self, layers: list[DecoderLayer]):
        graphdef = nnx.graphdef(layers[0])
        flats = [nnx.to_flat_state(nnx.state(layer)) for layer in layers]
        stacked = [(path, _stack_param([f[k][1] for f in flats]))
                   for k, (path, _) in enumerate(flats[0])]
        self.stacked = nnx.merge(graphdef, nnx.from_flat_state(stacked))
        self.num_layers = len(layers)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int) -> DecoderLayer:
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} of {self.num_layers}")
        graphdef, state = nnx.split(self.stacked)
        return nnx.merge(graphdef, layer_slice(state, i))

    def __iter__(self):
        graphdef, state = nnx.split(self.stacked)
        return (nnx.merge(graphdef, layer_slice(state, i)) for i in range(self.num_layers))


class ModelOutput(NamedTuple):
    """Forward results: logits [B,T,V] (None when not asked), hidden [B,T,H] after the final
    norm, each layer's keys and values (with `return_kv`, else None)."""

    logits: Optional[Array]
    hidden: Array
    kv: Optional[list[LayerKV]]


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2/Qwen2.5 causal LM."""

    def __init__(self, arch: ModelArch, num: Numerics | None = None, *, rngs: nnx.Rngs):
        num = num or Numerics()
        self.arch, self.num = arch, num
        self.embed_tokens = _param(rngs, (arch.vocab_size, arch.hidden_size), ("vocab", "embed"),
                                   num.param_dtype)
        layers = [DecoderLayer(arch, num, rngs) for _ in range(arch.num_hidden_layers)]
        self.layers = DecoderStack(layers) if num.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, num)
        self.lm_head = (None if arch.tie_word_embeddings else
                        Linear(arch.hidden_size, arch.vocab_size, ("embed", "vocab"), bias=False,
                               num=num, rngs=rngs))

    def lm_head_matrix(self) -> Array:
        """The output projection as [H, V] in compute dtype (a transposed view of the [V, H]
        embedding or head weight; XLA folds the transpose into the dot)."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        return w[...].astype(self.num.compute_dtype).T

    def logits(self, hidden: Array) -> Array:
        """Logits [.., V] from final hidden states."""
        logits = jnp.dot(hidden.astype(self.num.compute_dtype), self.lm_head_matrix())
        return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 positions: Optional[Array] = None, *,
                 return_logits: bool = True, return_kv: bool = False,
                 remat: Optional[bool] = None) -> ModelOutput:
        """Forward pass.

        input_ids/attention_mask/positions are [B, T]; left padding works (positions should
        count real tokens from 0); `return_kv` also returns each layer's keys/values
        [B, T, kv_heads, D] as `kv` (what the decode path's prefill stores, see decode.py).
        `remat` (a REMAT name or a boolean) overrides `Numerics.remat`; passes without
        gradients turn it off with False: there is no backward pass to save memory for.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), dtype=bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        q_slots = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
        mask_info = (q_slots, attention_mask)
        cos, sin = rope_cos_sin(positions, self.arch.resolved_head_dim, self.arch.rope_theta)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.num.compute_dtype)
        x = constrain(x, HIDDEN_AXES)
        policy = self.num.remat if remat is None else remat_policy_name(remat)

        def run_layer(layer, x):
            return layer(x, cos, sin, mask_info, return_kv)

        if isinstance(self.layers, DecoderStack):
            x, kv = scan_layers(run_layer, self.layers, x, policy)
        else:
            if policy != "none":
                run_layer = rematerialised(run_layer, policy)
            kv = [] if return_kv else None
            for layer in self.layers:
                x, layer_kv = run_layer(layer, x)
                if kv is not None:
                    kv.append(layer_kv)
        hidden = constrain(self.norm(x), HIDDEN_AXES)
        return ModelOutput(self.logits(hidden) if return_logits else None, hidden, kv)


def rematerialised(run_layer: Callable, policy: str = "full") -> Callable:
    """`run_layer(layer, x)` whose activations the backward pass recomputes (all of them, or
    all but those the REMAT_POLICIES entry `policy` keeps).

    A pure `jax.checkpoint` over the layer's split state rather than `nnx.remat`: the NNX
    transform tries to write the layer's Params back at its own trace level, which fails
    when the params come from an enclosing trace (`lax.map` / `lax.scan` / `shard_map` /
    a nested `jit` over params the outer `jit` owns). Nothing in a layer is mutated, so
    there is nothing to write back.
    """

    def run(layer, x):
        graphdef, state = nnx.split(layer)

        def pure(state, x):
            return run_layer(nnx.merge(graphdef, state), x)

        return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, x)

    return run


#: stacks of at most this many layers are scanned fully unrolled: the same stacked
#: parameters, but a straight-line program instead of a loop. Without remat the loop costs
#: XLA:CPU 10-50 % of the tiny train step (each layer's saved activations written into and
#: read back from stacked buffers; BUILD_NOTES "Scanned layers on by default"), and a
#: shallow unrolled body compiles as fast as the loop
UNROLL_MAX_LAYERS = 4


def scan_layers(run_layer: Callable, stack: DecoderStack, x: Array,
                policy: str) -> tuple[Array, Optional[list[LayerKV]]]:
    """`run_layer(layer, x) -> (x, kv)` over every layer of `stack` by one `jax.lax.scan` over
    the stacked state (each step merges that layer's slices into a `DecoderLayer`), under the
    remat `policy` per layer; each layer's kv (None when `run_layer` keeps none) as a list.
    Stacks of at most UNROLL_MAX_LAYERS layers are unrolled (no loop in the program)."""
    graphdef, state = nnx.split(stack.stacked)

    def body(x, layer_state):
        return run_layer(nnx.merge(graphdef, layer_state), x)

    unroll = stack.num_layers <= UNROLL_MAX_LAYERS
    if policy != "none":
        # in a loop CSE cannot merge the recomputation into the forward pass, so no barrier
        # is needed (JAX docs); unrolled, it could, as in the unrolled layers
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=unroll)
    x, kv = jax.lax.scan(body, x, state, unroll=unroll)
    if kv is None:
        return x, None
    return x, [LayerKV(kv.k[i], kv.v[i]) for i in range(stack.num_layers)]


def build_model(arch: ModelArch, num: Numerics | None = None, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised model on the default device (small models, tests)."""
    with nnx.use_eager_sharding(False):
        return Qwen2ForCausalLM(arch, num, rngs=nnx.Rngs(seed))


def with_layer_form(model: Qwen2ForCausalLM, scan_layers: bool) -> Qwen2ForCausalLM:
    """The model with its decoder layers stacked (`scan_layers`) or unrolled: the model itself
    when already so, else a new one sharing the embedding, final norm and head Variables,
    whose layer params are new arrays (stacked or sliced; place them with
    `mesh.state_shardings` where the sharding matters)."""
    if model.num.scan_layers == scan_layers:
        return model
    num = dataclasses.replace(model.num, scan_layers=scan_layers)
    out = abstract_model(model.arch, num)
    out.embed_tokens, out.norm, out.lm_head = model.embed_tokens, model.norm, model.lm_head
    layers = list(model.layers)
    out.layers = DecoderStack(layers) if scan_layers else nnx.List(layers)
    return out


def abstract_model(arch: ModelArch, num: Numerics | None = None) -> Qwen2ForCausalLM:
    """The model with ShapeDtypeStruct leaves: no memory, metadata intact (for loading)."""
    token = _ABSTRACT.set(True)
    try:
        with nnx.use_eager_sharding(False):
            return Qwen2ForCausalLM(arch, num, rngs=None)
    finally:
        _ABSTRACT.reset(token)


def matmul_params(arch: ModelArch) -> int:
    """Parameters that matmuls read per token: every linear layer and the LM head (the tied
    embedding counts once, as the head)."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.resolved_head_dim
    attn = h * arch.num_attention_heads * d * 2 + h * arch.num_key_value_heads * d * 2
    return arch.num_hidden_layers * (attn + 3 * h * i) + h * arch.vocab_size
