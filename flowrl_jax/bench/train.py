"""`flowrl-jax bench train`: tokens/s of the full train step against HF PyTorch, same run.

Ours: the jitted train step of flowrl_jax/rl/train_step.py (FlowRL loss with Z_φ, AdamW,
grad clip, non-finite guard, donated state). Reference: transformers' Qwen2ForCausalLM
forward + backward + torch.optim.AdamW with the same FlowRL loss and a torch Z_φ, on the
same shape and batch, random weights. Precision (`--dtype`): float32 on CPU; on
accelerators float32 parameters and optimizer with bfloat16 compute (ours: compute_dtype;
PyTorch: autocast), the usual mixed-precision recipe. Each side runs 1 warm-up step
(compile) and `--steps` timed steps; the best step time counts (the machine may be shared).
Any preset of configs/models is a shape (`--shapes qwen2.5-1.5b`).

Also reported: this CPU's measured float32 GEMM peak (a big matmul in the same run), the
model FLOPs of one step and the fraction of that peak each side reaches; on accelerators
the MFU against the vendor bf16 dense peak (`flowrl_jax.hardware.PEAK_FLOPS`).

Model FLOPs per step (standard accounting, no remat): 6·N_body·B·T (non-embedding
weights, every token) + 6·H·V·B·R (LM head, response positions only: the only ones whose
log-probs are needed) + 12·L·n_heads·head_dim·T·B·T (attention scores and values,
PaLM convention, causal mask not discounted) + 6·N_z·B (Z_φ).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from typing import Any, Optional

import numpy as np

from flowrl_jax.bench import add_dtype_argument, resolve_dtype
from flowrl_jax.config import ATTENTION, preset_arch
from flowrl_jax.hardware import measured_matmul_flops, peak_flops

#: the default shapes (any preset of configs/models can be named)
SHAPES = ("tiny", "qwen2.5-0.5b")


def mfu(flops_per_s: float, device_kind: str, n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation against the vendor peak of `n_devices` chips."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_s / (peak * n_devices)


def step_flops(arch: Any, batch: int, prompt: int, response: int, z_depth: int = 2) -> float:
    """Model FLOPs of one train step (see module docstring)."""
    h, v, l = arch.hidden_size, arch.vocab_size, arch.num_hidden_layers
    hd, nh, kv = arch.resolved_head_dim, arch.num_attention_heads, arch.num_key_value_heads
    t = prompt + response
    attn_w = h * nh * hd * 2 + h * kv * hd * 2  # q, o and k, v projections
    body = l * (attn_w + 3 * h * arch.intermediate_size)
    n_z = z_depth * h * h + h
    return (6.0 * body * batch * t + 6.0 * h * v * batch * response
            + 12.0 * l * nh * hd * t * batch * t + 6.0 * n_z * batch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma list of presets in configs/models (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=512, help="prompt + response tokens per sequence")
    parser.add_argument("--batch-tiny", type=int, default=4)
    parser.add_argument("--batch-large", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per side (default: 20 for tiny, 3 for the large shape)")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the number of layers of the large shape (memory-bound hosts)")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch side")
    add_dtype_argument(parser, "compute dtype (parameters stay float32)")
    parser.add_argument("--attention", choices=ATTENTION, default="auto",
                        help="model.attention of our side (see flowrl_jax.config.ATTENTION)")
    parser.add_argument("--remat", action="store_true", help="rematerialise each layer (ours)")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="run our decoder layers scanned (model.scan_layers=true, the "
                             "default, as the config's) or unrolled (--no-scan-layers)")


def _arch(shape: str):
    return preset_arch(shape, "bench train --shapes")


def _inputs(arch, b: int, p: int, r: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = p + r
    return {
        "input_ids": rng.integers(0, arch.vocab_size, (b, t)).astype(np.int32),
        "attention_mask": np.ones((b, t), bool),
        "response_mask": np.ones((b, r), np.float32),
        "old_logp": np.full((b, r), -math.log(arch.vocab_size), np.float32),
        "ref_logp": np.full((b, r), -math.log(arch.vocab_size), np.float32),
        "rhat": rng.normal(size=b).astype(np.float32),
    }


def _isolated(fn_name: str, *args: Any) -> dict[str, Any]:
    """Run one bench side in a fresh process (spawn): each side starts with all the memory
    the other freed, and an out-of-memory kill becomes an error row instead of a crash."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        try:
            return ex.submit(_call, fn_name, *args).result()
        except cf.process.BrokenProcessPool:
            return {"error": f"{fn_name}: worker died (killed, likely out of memory)"}


def _call(fn_name: str, *args: Any) -> dict[str, Any]:
    return globals()[fn_name](*args)


def bench_ours(arch, b: int, p: int, r: int, steps: int, compute_dtype: str = "auto",
               attention: str = "auto", remat: bool = False,
               scan_layers: bool = True) -> dict[str, Any]:
    """Best step time of our jitted FlowRL train step on one device (run in a fresh process,
    which gets the CLI's process settings first; the parent never touches, and on a GPU
    never preallocates, the accelerator). "auto" compute: float32 on CPU, else bfloat16."""
    from flowrl_jax import cpu_runtime

    cpu_runtime.configure()
    import jax

    from flowrl_jax.config import (AlgoConfig, Config, ModelConfig, RolloutConfig, TrainerConfig)
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.models.arch import param_count
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.rl.train_state import create_train_state
    from flowrl_jax.rl.train_step import make_train_step

    platform = jax.devices()[0].platform
    compute_dtype = resolve_dtype(compute_dtype, platform)
    cfg = Config(model=ModelConfig(param_dtype="float32", compute_dtype=compute_dtype,
                                   remat=remat, attention=attention, scan_layers=scan_layers),
                 algo=AlgoConfig(name="flowrl"),
                 trainer=TrainerConfig(mini_batch_size=b, micro_batch_size=b),
                 rollout=RolloutConfig(temperature=1.0))
    mesh = single_device_mesh()
    model = random_model(arch, Numerics.from_config(cfg.model), mesh, seed=0)
    n_params = param_count(arch)
    state = create_train_state(cfg, model, mesh, rng=0)
    del model
    print(f"[bench train] initialised {n_params / 1e6:.1f}M parameters", file=sys.stderr, flush=True)
    step = make_train_step(cfg, state, mesh)
    batch = step.place(_inputs(arch, b, p, r))
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    print(f"[bench train] compiled and ran the first step in {compile_s:.1f}s", file=sys.stderr,
          flush=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state.step, m))
        times.append(time.perf_counter() - t0)
    ok = float(m["skipped"]) == 0 and math.isfinite(float(m["loss"]))
    print(f"[bench train] ours: best of {steps} steps {min(times):.4f}s (ok={ok})", file=sys.stderr,
          flush=True)
    del state, step, batch
    gc.collect()
    return {"step_s": min(times), "compile_s": compile_s, "params": n_params, "ok": ok,
            "device": jax.devices()[0].device_kind, "platform": platform,
            "compute_dtype": compute_dtype}


def bench_reference(arch, b: int, p: int, r: int, steps: int, compute_dtype: str = "float32",
                    cuda: bool = False) -> dict[str, Any]:
    """Best step time of HF transformers Qwen2 (PyTorch) + the FlowRL loss + AdamW, on CUDA
    when `cuda` (our side ran on a GPU) and torch sees one, else on the CPU (float32 weights,
    `compute_dtype` autocast)."""
    import contextlib

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    dev = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    hf_cfg = Qwen2Config(**{k: v for k, v in arch.to_hf_dict(torch_dtype="float32").items()
                            if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    with dev:  # built on the device it runs on (no host init and copy)
        model = Qwen2ForCausalLM(hf_cfg).float()
    h = arch.hidden_size
    layers = []
    for _ in range(2):
        layers += [torch.nn.Linear(h, h), torch.nn.GELU(), torch.nn.LayerNorm(h), torch.nn.Dropout(0.1)]
    znet = torch.nn.Sequential(*layers, torch.nn.Linear(h, 1)).to(dev)
    params = list(model.parameters()) + list(znet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    data = {k: torch.from_numpy(np.asarray(v)).to(dev) for k, v in _inputs(arch, b, p, r).items()}
    autocast = (torch.autocast(dev.type, dtype=getattr(torch, compute_dtype))
                if compute_dtype != "float32" else contextlib.nullcontext())
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = data["input_ids"].long()
    am = data["attention_mask"].long()
    # no padding in the bench batch: without a mask HF's SDPA runs its causal flash kernel
    # instead of a materialised [B, 1, T, T] mask (the fair, fast reference)
    am_arg = None if bool(am.all()) else am
    beta = 15.0

    def one_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            hidden = model.model(input_ids=ids, attention_mask=am_arg).last_hidden_state
            logits = model.lm_head(hidden[:, p - 1:-1]).float()
            pm = am[:, :p, None].float()
            log_z = znet((hidden[:, :p].float() * pm).sum(1) / pm.sum(1))[:, 0].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None])[..., 0]
        mask = data["response_mask"]
        n = mask.sum(-1)
        delta = log_z + (logp * mask).sum(-1) / n - beta * data["rhat"] - (data["ref_logp"] * mask).sum(-1) / n
        log_w = ((logp - data["old_logp"]) * mask).sum(-1).detach().clamp(-20, 20)
        w = torch.exp(log_w).clamp(max=10.0)
        loss = (w * delta ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())  # (synchronises)

    t0 = time.perf_counter()
    one_step()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    torch_peak = _torch_sgemm_gflops() if dev.type == "cpu" else None
    del model, znet, opt, params
    gc.collect()
    return {"step_s": min(times), "warmup_s": warm_s, "torch_sgemm_gflops": torch_peak,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}


def _torch_sgemm_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def run(args: argparse.Namespace) -> list[dict]:
    """One row per shape: tokens/s ours vs reference, ratio, fraction of the SGEMM peak, MFU."""
    shapes = [s.strip() for s in str(getattr(args, "shapes", ",".join(SHAPES))).split(",") if s.strip()]
    archs = {s: _arch(s) for s in shapes}  # unknown names fail here, before any compute
    seq = int(getattr(args, "seq", 512))
    p = seq // 2
    r = seq - p
    steps_arg = getattr(args, "steps", None)
    dtype = getattr(args, "dtype", "auto")
    attention, remat = getattr(args, "attention", "auto"), bool(getattr(args, "remat", False))
    scan_layers = bool(getattr(args, "scan_layers", True))
    use_ref = not getattr(args, "no_reference", False)
    peak_gflops: Optional[float] = None
    rows = []
    for shape in shapes:
        arch = archs[shape]
        b = int(getattr(args, "batch_tiny", 4) if shape == "tiny" else getattr(args, "batch_large", 2))
        tokens = b * seq
        layers = getattr(args, "layers", None)
        if layers and shape != "tiny":
            arch = dataclasses.replace(arch, num_hidden_layers=int(layers))
        flops = step_flops(arch, b, p, r)
        # tiny steps take milliseconds: more of them make the best one representative
        steps = int(steps_arg) if steps_arg is not None else (20 if shape == "tiny" else 3)
        ours = _isolated("bench_ours", arch, b, p, r, steps, dtype, attention, remat, scan_layers)
        ref = (_isolated("bench_reference", arch, b, p, r, steps, ours["compute_dtype"],
                         ours["platform"] == "gpu")
               if use_ref and "error" not in ours else None)
        if "error" in ours or (ref is not None and "error" in ref):
            rows.append({"shape": shape, "unit": "tokens/s", "ours": None, "reference": None,
                         "ratio": None, "batch": b, "seq": seq,
                         "layers": arch.num_hidden_layers,
                         "error": "; ".join(x["error"] for x in (ours, ref) if x and "error" in x)})
            continue
        on_cpu = ours["platform"] == "cpu"
        if on_cpu and peak_gflops is None:
            peak_gflops = measured_matmul_flops() / 1e9
        ours_tps = tokens / ours["step_s"]
        row: dict[str, Any] = {
            "shape": shape, "unit": "tokens/s", "ours": ours_tps,
            "reference": None if ref is None else tokens / ref["step_s"],
            "ratio": None if ref is None else ref["step_s"] / ours["step_s"],
            "batch": b, "seq": seq, "layers": arch.num_hidden_layers, "params": ours["params"],
            "compute_dtype": ours["compute_dtype"], "attention": attention, "remat": remat,
            "scan_layers": scan_layers, "step_flops": flops,
            "ours_step_s": ours["step_s"], "ours_compile_s": ours["compile_s"],
            "ours_tflops": flops / ours["step_s"] / 1e12, "ours_ok": ours["ok"],
            "device": ours["device"],
        }
        if ref is not None:
            row["reference_step_s"] = ref["step_s"]
            row["reference_tflops"] = flops / ref["step_s"] / 1e12
            row["reference_device"] = ref["device"]
        if on_cpu:
            peak = max(peak_gflops, (ref or {}).get("torch_sgemm_gflops") or 0.0)
            row["sgemm_gflops"] = peak
            row["ours_frac_of_sgemm_peak"] = flops / ours["step_s"] / (peak * 1e9)
            if ref is not None:
                row["reference_frac_of_sgemm_peak"] = flops / ref["step_s"] / (peak * 1e9)
        else:
            row["mfu"] = mfu(flops / ours["step_s"], ours["device"])
            if ref is not None:
                row["reference_mfu"] = mfu(flops / ref["step_s"], ours["device"])
        rows.append(row)
    return rows
