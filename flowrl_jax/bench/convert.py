"""`flowrl-jax bench convert`: HF safetensors import throughput vs raw file read.

Writes a random float32 checkpoint of the Qwen2.5-0.5B shape (≈ 2 GB, several shards) to a
temp dir, then measures, both with a warm page cache (the files are read once first; we
cannot drop the cache without root, and warm-vs-warm is the fair comparison):
- reference: raw read of every byte of the same files (readinto a reused 64 MiB buffer), in
  a fresh subprocess like ours (the parent's allocator state changed it by up to 2×);
- raw_fresh_mem: the same bytes read into newly allocated memory (np.fromfile) in a fresh
  subprocess: the plain-read baseline when the result must live in new pages;
- ours: `checkpoint.hf.load_hf` (header parse, read or map each tensor, place into sharded
  jax arrays on all local devices), in a fresh subprocess so that peak RSS is clean.
  Tensors whose data is 64-byte aligned in the file are mapped in place (no copy); the
  others are read into fresh memory (`aligned_fraction` says how much was aligned: the
  checkpoint is written by safetensors' own writer, whose alignment is luck).
  `ours_data_path` excludes building the abstract model (`abstract_trace_s`).
A second row times `export_hf` against safetensors' own `save_file` of the same tensors
already on the host (page-cache writes). A third imports that export (ours aligns every
tensor to 64 bytes) against a raw read of its files.
Best of `--repeats` for both. Peak RSS "extra" = peak − RSS before loading − final arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASE = "qwen2.5-0.5b-f32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--shard-size", default="500MB", help="safetensors shard size")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best)")
    parser.add_argument("--preset", default="qwen2.5-0.5b", help="model preset (shape)")


def _arch(preset: str):
    import yaml

    from flowrl_jax.config import CONFIG_DIR, ModelArch
    return ModelArch(**yaml.safe_load((CONFIG_DIR / "models" / f"{preset}.yaml").read_text()))


def write_random_checkpoint(out: Path, arch, shard_size: str, seed: int = 0) -> list[Path]:
    """A random float32 HF checkpoint of `arch`, several shards, written straight from numpy."""
    from safetensors.numpy import save_file

    from flowrl_jax.checkpoint.hf import INDEX_FILE, expected_params, hf_name
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.checkpoint.safetensors_io import parse_size

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    limit = parse_size(shard_size)
    tensors = []
    for path, var in expected_params(arch, Numerics(scan_layers=False)):  # one per HF tensor
        tensors.append((hf_name(path), tuple(var.get_value().shape)))
    groups: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 4
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (rng.random(s, dtype=np.float32) - 0.5) * 0.04 for n, s in group}
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
        files.append(out / fname)
        weight_map.update({n: fname for n, _ in group})
    total = sum(f.stat().st_size for f in files)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(arch.to_hf_dict("float32")))
    return files


def aligned_fraction(ckpt: Path) -> float:
    """Fraction of the checkpoint's bytes whose offsets allow a zero-copy import."""
    from flowrl_jax.checkpoint.hf import index_tensors
    from flowrl_jax.checkpoint.safetensors_io import ZERO_COPY_ALIGN

    entries = list(index_tensors(ckpt).values())
    total = sum(e.nbytes for e in entries)
    return sum(e.nbytes for e in entries if e.start % ZERO_COPY_ALIGN == 0) / max(total, 1)


def raw_read(files: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) to read every byte of `files` into a reused buffer."""
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(mv):
                n += k
    return n, time.perf_counter() - t0


def _child(ckpt: str, mode: str = "ours") -> None:
    """Run in a fresh process: load the checkpoint, print timing and memory as JSON.

    mode "ours": `load_hf`; mode "fresh": read each file into newly allocated host memory
    (np.fromfile), the least any loader must do when the result lives in new memory.
    """
    import resource

    import jax
    import psutil

    from flowrl_jax.checkpoint.hf import load_hf
    from flowrl_jax.mesh import make_mesh

    mesh = make_mesh()
    jax.block_until_ready(jax.device_put(np.zeros(4)))  # backend up before the baseline
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "export":
        _export_child(ckpt, mesh)
        return
    if mode == "raw":
        files = sorted(Path(ckpt).glob("*.safetensors"))
        n, secs = min((raw_read(files) for _ in range(2)), key=lambda r: r[1])
        print(json.dumps({"seconds": secs, "bytes": n}))
        return
    if mode == "fresh":
        leaves = [np.fromfile(f, dtype=np.uint8) for f in sorted(Path(ckpt).glob("*.safetensors"))]
    else:
        # Time the (cached) abstract-model trace separately: a constant cost per architecture.
        from flowrl_jax.checkpoint.hf import _abstract, read_arch
        from flowrl_jax.models.qwen2 import Numerics
        _abstract(read_arch(ckpt), Numerics())
        t_abstract = time.perf_counter() - t0
        model, _ = load_hf(ckpt, mesh)
        leaves = jax.tree.leaves(model)
        jax.block_until_ready(leaves)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arrays = sum(x.nbytes for x in leaves)
    print(json.dumps({"seconds": secs, "base_rss": base,
                      "abstract_seconds": t_abstract if mode != "fresh" else 0.0, "peak_rss": peak,
                      "peak_before": peak_before, "final_rss": proc.memory_info().rss,
                      "arrays": arrays, "devices": len(mesh.devices.flat)}))


def _export_child(ckpt: str, mesh) -> None:
    """Time export_hf vs safetensors' own save_file of the same (already host) tensors."""
    from safetensors.numpy import save_file

    from flowrl_jax.checkpoint.hf import export_hf, hf_tensors, load_hf
    from flowrl_jax.checkpoint.safetensors_io import parse_size

    model, arch = load_hf(ckpt, mesh)
    out = Path(ckpt).parent / "export"
    ref_dir = Path(ckpt).parent / "export-ref"
    ref_dir.mkdir(exist_ok=True)
    host = {name: np.asarray(arr) for name, arr in hf_tensors(model)}
    limit, shard, size, k = parse_size("500MB"), {}, 0, 0
    os.sync()  # each writer starts with no dirty pages of the other's (or an earlier run's)
    t0 = time.perf_counter()
    for name, arr in host.items():
        if shard and size + arr.nbytes > limit:
            save_file(shard, str(ref_dir / f"{k}.safetensors"))
            shard, size, k = {}, 0, k + 1
        shard[name] = arr
        size += arr.nbytes
    save_file(shard, str(ref_dir / f"{k}.safetensors"))
    ref_s = time.perf_counter() - t0
    del host, shard
    os.sync()
    t0 = time.perf_counter()
    s = export_hf(model, arch, out, shard_size="500MB")
    secs = time.perf_counter() - t0
    shutil.rmtree(ref_dir, ignore_errors=True)  # `out` stays: the parent imports it next
    print(json.dumps({"seconds": secs, "ref_seconds": ref_s, "bytes": s.bytes}))


def run(args: argparse.Namespace) -> list[dict]:
    from flowrl_jax.checkpoint.hf import index_tensors

    arch = _arch(args.preset)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="flowrl-bench-convert-"))
    ckpt = root / "hf"
    try:
        t0 = time.perf_counter()
        files = write_random_checkpoint(ckpt, arch, args.shard_size)
        print(f"bench convert: wrote {len(files)} shards in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        largest = max(e.nbytes for e in index_tensors(ckpt).values())
        raw_read(files)  # warm the page cache
        env = dict(os.environ)

        def child(mode: str, path: Path = ckpt) -> dict:
            r = subprocess.run([sys.executable, "-m", "flowrl_jax.bench.convert", str(path), mode],
                               capture_output=True, text=True, env=env, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"bench convert child failed:\n{r.stderr[-3000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        children, fresh, raws = [], [], []
        for _ in range(max(1, args.repeats)):  # interleaved so that load changes hit all
            raws.append(child("raw"))
            children.append(child("ours"))
            fresh.append(child("fresh"))
        nbytes = raws[0]["bytes"]
        raw_mbs = nbytes / min(r["seconds"] for r in raws) / 1e6
        best = min(children, key=lambda c: c["seconds"])
        fresh_mbs = nbytes / min(c["seconds"] for c in fresh) / 1e6
        ours_mbs = nbytes / best["seconds"] / 1e6
        peak = max(c["peak_rss"] for c in children)
        extra = max(c["peak_rss"] - c["base_rss"] - c["arrays"] for c in children)
        gb = 1 << 30
        bound = 2 * largest + gb
        exports = [child("export") for _ in range(max(1, args.repeats))]
        ex_mbs = max(e["bytes"] / e["seconds"] for e in exports) / 1e6
        ref_ex_mbs = max(e["bytes"] / e["ref_seconds"] for e in exports) / 1e6
        export_row = {"case": CASE + "-export", "ours": ex_mbs, "reference": ref_ex_mbs,
                      "unit": "MB/s", "ratio": ex_mbs / ref_ex_mbs}
        # Our own export aligns tensor data to 64 bytes: importing it maps the files in place.
        exported = root / "export"
        ex_files = sorted(exported.glob("*.safetensors"))
        ex_bytes = sum(f.stat().st_size for f in ex_files)
        ex_raw = ex_bytes / min(child("raw", exported)["seconds"] for _ in range(max(1, args.repeats)))
        ex_ours = min(child("ours", exported)["seconds"] for _ in range(max(1, args.repeats)))
        aligned_row = {"case": CASE + "-own-export", "ours": ex_bytes / ex_ours / 1e6,
                       "reference": ex_raw / 1e6, "unit": "MB/s",
                       "ratio": ex_bytes / ex_ours / ex_raw,
                       "aligned_fraction": aligned_fraction(exported)}
        return [{
            "case": CASE, "ours": ours_mbs, "reference": raw_mbs, "unit": "MB/s",
            "ratio": ours_mbs / raw_mbs, "raw_fresh_mem": fresh_mbs,
            "aligned_fraction": aligned_fraction(ckpt),
            "ours_data_path": nbytes / (best["seconds"] - best["abstract_seconds"]) / 1e6,
            "abstract_trace_s": best["abstract_seconds"],
            "ratio_vs_fresh": ours_mbs / fresh_mbs, "size_gb": nbytes / gb, "load_s": best["seconds"],
            "peak_rss_gb": peak / gb, "arrays_gb": best["arrays"] / gb, "extra_rss_gb": extra / gb,
            "largest_tensor_gb": largest / gb, "bound_gb": bound / gb,
            "within_bound": bool(extra <= bound),
        }, export_row, aligned_row]
    finally:
        if not args.keep:
            for d in ([root] if not args.dir else [ckpt, root / "export"]):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ours")
