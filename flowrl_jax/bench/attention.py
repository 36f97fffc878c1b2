"""`flowrl-jax bench attention`: forward + backward time of each no-cache attention kernel
that `model.attention` can select, on a train-batch layout (left-padded prompts, right-padded
responses), with each kernel's error against a float32 full-softmax reference.

Kernels (the names are `model.attention` values): "xla" (jax.nn.dot_product_attention with
the [B,1,T,T] mask: XLA's materialised softmax), "plain" (our blocked flash attention,
attention.py: "auto"'s choice except on NVIDIA GPUs in 16-bit), "cudnn" (the fused kernel on
rows rotated to start at slot 0: cuDNN in 16-bit on NVIDIA GPUs, "auto"'s choice there; XLA
elsewhere). `ratio` is the
"xla" kernel's time ÷ this kernel's: the speed-up over the materialised softmax.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np

from flowrl_jax.bench import add_dtype_argument, resolve_dtype

KERNELS = ("xla", "plain", "cudnn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12, help="query heads (Qwen2.5-1.5B: 12)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    add_dtype_argument(parser, "q, k and v")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--repeats", type=int, default=5)


def kernel_fn(name: str) -> Callable:
    """(q, k, v, k_valid) -> out for a `model.attention` name, as the model computes it."""
    from flowrl_jax.models.attention import contiguous_causal_attention, flash_attention
    from flowrl_jax.models.qwen2 import attention_weights_mask, dot_attention

    def xla(q, k, v, valid):
        import jax.numpy as jnp

        slots = jnp.broadcast_to(jnp.arange(q.shape[1])[None, :], valid.shape)
        return dot_attention(q, k, v, attention_weights_mask(slots, valid), "xla")

    table = {"xla": xla, "plain": flash_attention, "cudnn": contiguous_causal_attention}
    if name not in table:
        raise ValueError(f"bench attention --kernels: unknown kernel {name!r} (known: {', '.join(KERNELS)})")
    return table[name]


def train_layout(b: int, t: int, seed: int = 0) -> np.ndarray:
    """[B, T] validity: each row a left-padded prompt (half of T) + right-padded response."""
    rng = np.random.default_rng(seed)
    valid = np.zeros((b, t), bool)
    half = t // 2
    for i in range(b):
        valid[i, rng.integers(0, half // 4 + 1):half + rng.integers(half * 3 // 4, half + 1)] = True
    return valid


def _rel_err(x, ref, real) -> float:
    x = np.where(real, np.asarray(x, np.float32), 0)
    ref = np.where(real, np.asarray(ref, np.float32), 0)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp

    names = [s.strip() for s in args.kernels.split(",") if s.strip()]
    fns = {n: kernel_fn(n) for n in names}
    dev = jax.devices()[0]
    dtype = resolve_dtype(args.dtype, dev.platform)
    b, t, n, kh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    qkv = [rng.normal(size=(b, t, h, d)).astype(np.float32) for h in (n, kh, kh)]
    w = rng.normal(size=(b, t, n, d)).astype(np.float32)
    valid = train_layout(b, t)
    real_q = valid[:, :, None, None]
    jvalid = jnp.asarray(valid)
    jw = jnp.asarray(w * real_q, dtype)  # the loss reads real query positions only

    def loss_and_grads(fn):
        # mask and weights are arguments: as closed-over constants XLA:GPU spent most of the
        # compile constant-folding transposes of them
        def loss(q, k, v, valid_, w_):
            out = fn(q, k, v, valid_)
            return jnp.sum(out.astype(jnp.float32) * w_), out
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        return lambda q, k, v: grad(q, k, v, jvalid, jw)

    # reference: float32 full masked softmax at full matmul precision
    with jax.default_matmul_precision("highest"):
        ref_fn = loss_and_grads(kernel_fn("xla"))
        (_, ref_out), ref_grads = ref_fn(*[jnp.asarray(x) for x in qkv])
    ref = [np.asarray(ref_out)] + [np.asarray(g) for g in ref_grads]
    del ref_out, ref_grads

    inputs = [jnp.asarray(x, dtype) for x in qkv]
    rows: list[dict[str, Any]] = []
    times: dict[str, float] = {}
    for name in names:
        row: dict[str, Any] = {"kernel": name, "batch": b, "seq": t, "heads": n, "kv_heads": kh,
                               "head_dim": d, "dtype": dtype, "unit": "ms fwd+bwd",
                               "device": dev.device_kind}
        try:
            f = loss_and_grads(fns[name])
            jax.block_until_ready(f(*inputs))
            best = float("inf")
            for _ in range(max(1, args.repeats)):
                t0 = time.perf_counter()
                (_, out), grads = f(*inputs)
                jax.block_until_ready((out, grads))
                best = min(best, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a kernel this backend lacks is a row, not a crash
            rows.append({**row, "ours": None, "reference": None, "ratio": None,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        times[name] = best
        errs = [_rel_err(out, ref[0], real_q)] + [
            _rel_err(g, r, real_q if i == 0 else np.ones_like(real_q))
            for i, (g, r) in enumerate(zip(grads, ref[1:]))]
        row.update({"ours": best * 1e3, "rel_err_out": errs[0], "rel_err_grad": max(errs[1:]),
                    "finite": bool(all(np.all(np.isfinite(np.asarray(x))) for x in (out, *grads)))})
        rows.append(row)
    base = times.get("xla")
    for row in rows:
        if row.get("ours") is not None:
            row["reference"] = None if base is None else base * 1e3
            row["ratio"] = None if base is None else base / (row["ours"] / 1e3)
    return rows
