"""Compile each program of an RL step for a TPU slice and report HBM per chip, fit and FLOPs.

HBM per chip = the compiled program's arguments + outputs + temporaries − aliases
(`compiled.memory_analysis()`) + what stays resident beside it (programs.py), compared with
the chip's HBM capacity. A program the TPU compiler refuses for lack of HBM is reported as
not fitting with the figures from its error message; one whose arguments and resident
buffers alone (exact, from their shardings) exceed the capacity is reported as not fitting
without compiling it (that sum is then its figure, a lower bound). The memory estimator's figure
(memory.py, the trainer's up-front check) is printed beside the compiled one.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from jax.sharding import Mesh

from flowrl_jax.aot.programs import Program, step_programs
from flowrl_jax.aot.topologies import Slice, slice_devices
from flowrl_jax.algos import get_algorithm
from flowrl_jax.checkpoint.load import arch_from_config
from flowrl_jax.config import CONFIG_DIR, Config, ConfigError, ModelArch, preset_arch
from flowrl_jax.memory import MemoryEstimate, estimate
from flowrl_jax.mesh import make_mesh
from flowrl_jax.paths import is_url

GiB = 1024 ** 3


@dataclass
class Row:
    """One program's result (the `--json` line)."""

    program: str
    topology: str
    compile_s: float  # lowering + compilation
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    resident_bytes: int
    hbm_bytes_per_chip: int
    hbm_capacity_bytes: int
    fits: bool
    overflow_bytes: int  # hbm_bytes_per_chip − capacity when it does not fit, else 0
    flops: Optional[float]
    estimate_bytes_per_chip: Optional[int]
    shapes: str
    error: Optional[str] = None


def compiled_bytes(stats: Any) -> tuple[int, int, int, int]:
    """(arguments, outputs, temporaries, aliases) of a `compiled.memory_analysis()`."""
    return (int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
            int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes))


def flops_of(compiled: Any) -> Optional[float]:
    """FLOPs from the cost analysis (one dict, or a list of one per computation)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}
# e.g. "the total memory required for HLO temporaries (115.63G) exceeds available HBM
# (15.75G)" or "Used 17.25G of 15.75G hbm"
_OOM = re.compile(r"\(?([\d.]+)([KMGT]?)B?\)?\s+(?:of|exceeds? available HBM)\s+\(?([\d.]+)([KMGT]?)",
                  re.IGNORECASE)


def oom_bytes(message: str) -> Optional[int]:
    """The bytes a TPU compiler's out-of-memory error says the program needs, if it says."""
    m = _OOM.search(message)
    if m is None or not re.search(r"hbm|memory", message, re.IGNORECASE):
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def estimator_bytes(program: str, est: MemoryEstimate) -> int:
    """The estimator's per-chip figure for the peak while `program` runs."""
    return int(est.program_bytes(program))


def measure(prog: Program, topology: str, capacity: int,
            est: Optional[MemoryEstimate]) -> Row:
    """Lower and compile one program; its row."""
    t0 = time.perf_counter()
    figure = estimator_bytes(prog.name, est) if est is not None else None
    floor = prog.argument_bytes + prog.resident_bytes
    if floor > capacity:  # cannot fit whatever the compiler does: no need to compile it
        return Row(prog.name, topology, 0.0, prog.argument_bytes, 0, 0, 0, prog.resident_bytes,
                   floor, capacity, False, floor - capacity, None, figure, prog.shapes,
                   f"not compiled: its arguments and the resident buffers alone need "
                   f"{floor / GiB:.2f} GiB per chip")
    try:
        compiled = prog.lower().compile()
    except Exception as e:  # noqa: BLE001 - a program the compiler refuses is a result
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
        need = oom_bytes(str(e))
        total = need + prog.resident_bytes if need is not None else 0
        return Row(prog.name, topology, round(time.perf_counter() - t0, 1), 0, 0, 0, 0,
                   prog.resident_bytes, total, capacity, False, max(0, total - capacity), None,
                   figure, prog.shapes, msg)
    seconds = time.perf_counter() - t0
    args, outs, temps, aliases = compiled_bytes(compiled.memory_analysis())
    total = args + outs + temps - aliases + prog.resident_bytes
    return Row(prog.name, topology, round(seconds, 1), args, outs, temps, aliases,
               prog.resident_bytes, total, capacity, total <= capacity,
               max(0, total - capacity), flops_of(compiled), figure, prog.shapes)


def check_arch(cfg: Config) -> ModelArch:
    """The architecture to compile: `model.path`'s config when the path exists, else
    `model.preset`/`model.arch`, else the preset named like the path's folder (the shipped
    configs' `models/Qwen2.5-7B` is preset `qwen2.5-7b`); no weights are read."""
    if cfg.model.path and (is_url(cfg.model.path) or Path(cfg.model.path).exists()):
        return arch_from_config(cfg.model)
    if cfg.model.arch is None and cfg.model.path:
        name = Path(cfg.model.path.rstrip("/")).name.lower()
        if (CONFIG_DIR / "models" / f"{name}.yaml").exists():
            return preset_arch(name, "model.path")
    if cfg.model.arch is None:
        where = f"model.path {cfg.model.path!r} does not exist and " if cfg.model.path else ""
        raise ConfigError(f"model: {where}no model.preset is set; give model.preset=NAME "
                          "(e.g. model.path=null model.preset=qwen2.5-7b)")
    return cfg.model.arch


def check_mesh(cfg: Config, sl: Slice) -> Mesh:
    """The config's mesh on the slice's devices (ConfigError naming mesh keys if it can't)."""
    try:
        return make_mesh(cfg.mesh, slice_devices(sl), whole_slice=True)
    except ConfigError as e:
        raise ConfigError(f"--topology {sl.name} ({sl.chips} chips): {e}") from e


def run_check(cfg: Config, arch: ModelArch, sl: Slice, *, only: Optional[set[str]] = None,
              capacity_bytes: Optional[int] = None, as_json: bool = False,
              out: Optional[TextIO] = None) -> list[Row]:
    """Compile every program of one RL step of `cfg` for slice `sl`, printing a row each as
    it completes. `capacity_bytes` replaces the chip's HBM (tests)."""
    out = out or sys.stdout
    capacity = int(capacity_bytes if capacity_bytes is not None else sl.hbm_bytes)
    mesh = check_mesh(cfg, sl)
    hosts = sorted({d.process_index for d in mesh.devices.flat})
    local = sum(1 for d in mesh.devices.flat if d.process_index == hosts[0])
    est = estimate(cfg, arch, dict(mesh.shape), budget=(capacity, sl.name),
                   uses_ref=bool(get_algorithm(cfg.algo.name).uses_ref(cfg.algo)),
                   sampler_local_devices=local if len(hosts) > 1 else None,
                   # the programs run on TPU, whose chips report their free memory: the
                   # paged pool is sized from it (programs.py compiles that pool too)
                   platform="tpu", devices_report_memory=True,
                   tpu_generation=sl.topology.split(":")[0])
    programs = step_programs(cfg, arch, mesh, only, hbm_bytes=capacity)
    if not as_json:
        print(f"{sl.name}: {sl.chips} chips on {len(hosts)} host(s), mesh "
              f"{dict(mesh.shape)}, {capacity / GiB:.2f} GiB HBM per chip; "
              f"{arch.num_hidden_layers} layers, hidden {arch.hidden_size}", file=out)
        print(f"{'program':<16}{'compile s':>10}{'HBM GiB':>9}{'of':>7}  {'fits':<5}"
              f"{'args':>7}{'out':>7}{'temp':>7}{'alias':>7}{'resid':>7}{'TFLOP':>9}"
              f"{'estim.':>8}  shapes", file=out, flush=True)
    rows = []
    for prog in programs:
        row = measure(prog, sl.name, capacity, est)
        rows.append(row)
        if as_json:
            print(json.dumps(asdict(row)), file=out, flush=True)
        else:
            print(format_row(row), file=out, flush=True)
    return rows


def format_row(r: Row) -> str:
    """One human-readable line (GiB per chip)."""
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    tf = f"{r.flops / 1e12:9.2f}" if r.flops is not None else f"{'-':>9}"
    est = f"{r.estimate_bytes_per_chip / GiB:8.2f}" if r.estimate_bytes_per_chip is not None else ""
    line = (f"{r.program:<16}{r.compile_s:10.1f}{r.hbm_bytes_per_chip / GiB:9.2f}"
            f"{r.hbm_capacity_bytes / GiB:7.2f}  {('yes' if r.fits else 'NO'):<5}"
            f"{g(r.argument_bytes)}{g(r.output_bytes)}{g(r.temp_bytes)}{g(r.alias_bytes)}"
            f"{g(r.resident_bytes)}{tf}{est}  {r.shapes}")
    if r.error:
        line += f"\n    {r.error}"
    return line


def summary(rows: list[Row]) -> str:
    """The verdict: everything fits, or which programs overflow by how much."""
    bad = [r for r in rows if not r.fits]
    if not bad:
        return f"all {len(rows)} programs fit"
    parts = []
    for r in bad:
        if r.hbm_bytes_per_chip:
            parts.append(f"{r.program} needs {r.hbm_bytes_per_chip / GiB:.2f} GiB per chip of "
                         f"{r.hbm_capacity_bytes / GiB:.2f} GiB (over by "
                         f"{r.overflow_bytes / GiB:.2f} GiB)")
        else:
            parts.append(f"{r.program} did not compile: {r.error}")
    return "does not fit: " + "; ".join(parts)
