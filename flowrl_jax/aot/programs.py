"""The programs of one RL step, lowered on abstract inputs for a mesh of (TPU) devices.

Each `Program` pairs a name with a thunk that lowers the package's own jitted function
(the train step, the log-prob passes, the sampler's kernels) on ShapeDtypeStructs carrying
NamedShardings, at the largest shapes the config lets a step reach: full prompt + response
length, the mini-batch, the whole rollout batch for the log-prob passes, the decode slots
one host runs. `resident_bytes` counts what stays in HBM next to the program without being
one of its arguments (the train state while the sampler runs, the reference copy), so
that arguments + outputs + temporaries − aliases + resident is the chip's peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import Config, MeshConfig, ModelArch
from flowrl_jax.mesh import make_mesh, named_sharding, replicated
from flowrl_jax.models.decode import CACHE_AXES
from flowrl_jax.models.qwen2 import Numerics, abstract_model
from flowrl_jax.rl.forward import batch_shardings
from flowrl_jax.rl.logprobs import LogProbs
from flowrl_jax.rl.rollout_batch import ADVANTAGE_KEYS, MODEL_KEYS, UPDATE_KEYS
from flowrl_jax.rl.train_state import TrainState, abstract_train_state, abstract_tree
from flowrl_jax.rl.train_step import TrainStep
from flowrl_jax.sampling.engine import MAX_STOP_IDS, SamplingEngine
from flowrl_jax.sampling.kernels import bucket, pow2
from flowrl_jax.sampling.params import SamplingParams, SamplingSpec
from flowrl_jax.sampling.random import key_width

PROGRAMS = ("train_step", "logprobs_old", "logprobs_ref", "sampler_prefill", "sampler_insert",
            "sampler_admit", "sampler_decode")


@dataclass
class Program:
    """One program of the step: `lower()` gives its `jax.stages.Lowered`."""

    name: str
    lower: Callable[[], Any]
    resident_bytes: int  # per chip, live in HBM beside the program, not among its arguments
    shapes: str  # the shapes it is compiled for, for the report
    argument_bytes: int = 0  # per chip, its arguments (exact, from their shardings)


def bytes_per_chip(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the first device's shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            continue  # a static argument
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _sds(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _sharded(batch: dict[str, jax.ShapeDtypeStruct], mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch with the train step's / log-prob pass's batch shardings."""
    shardings = batch_shardings(batch, mesh)
    return {k: _sds(v.shape, v.dtype, shardings[k]) for k, v in batch.items()}


def model_batch(rows: int, prompt: int, response: int) -> dict[str, jax.ShapeDtypeStruct]:
    """What the log-prob pass reads, for `rows` rows of prompt + response tokens (unsharded)."""
    t = prompt + response
    return {"input_ids": _sds((rows, t), jnp.int32, None),
            "attention_mask": _sds((rows, t), jnp.int32, None),
            "response_mask": _sds((rows, response), jnp.int32, None)}


def train_batch(cfg: Config, rows: int, prompt: int, response: int,
                uses_ref: bool, needs_critic: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """What the train step reads (RolloutBatch.train_inputs), for `cfg.algo.name` (unsharded):
    the model inputs, the log-prob pass's outputs and the algorithm's `advantages`."""
    algo = get_algorithm(cfg.algo.name)
    batch = model_batch(rows, prompt, response)
    per_token = _sds((rows, response), jnp.float32, None)
    batch.update(old_logp=per_token, rewards=_sds((rows,), jnp.float32, None),
                 group_ids=_sds((rows,), jnp.int32, None), seq_mask=_sds((rows,), jnp.int32, None))
    if uses_ref:
        batch["ref_logp"] = per_token
    if needs_critic:
        batch["old_values"] = per_token
    adv_in = {k: v for k, v in batch.items() if k in ADVANTAGE_KEYS}
    batch.update(jax.eval_shape(lambda b: algo.advantages(b, cfg.algo), adv_in))
    keep = set(MODEL_KEYS) | set(UPDATE_KEYS)
    return {k: _sds(v.shape, v.dtype, None) for k, v in batch.items() if k in keep}


def sampler_mesh(mesh: Mesh) -> Mesh:
    """The mesh the sampler runs on: the whole mesh on one host; on several, the first
    host's chips (each host samples its own prompts, as the trainer's `sample_mesh`)."""
    hosts = sorted({d.process_index for d in mesh.devices.flat})
    if len(hosts) == 1:
        return mesh
    local = sorted((d for d in mesh.devices.flat if d.process_index == hosts[0]),
                   key=lambda d: d.id)
    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), local)


def step_programs(cfg: Config, arch: ModelArch, mesh: Mesh,
                  only: Optional[set[str]] = None,
                  hbm_bytes: Optional[int] = None) -> list[Program]:
    """The programs one RL step of `cfg` runs on `mesh` (all of `PROGRAMS`, or those in `only`).
    `hbm_bytes`: a chip's HBM, from which the paged engine sizes its pool as on the chips."""
    algo = get_algorithm(cfg.algo.name)
    uses_ref = bool(algo.uses_ref(cfg.algo))
    state: TrainState = abstract_train_state(cfg, arch, mesh)
    state_bytes = bytes_per_chip(state)
    policy_bytes = bytes_per_chip(state.params["policy"])
    ref_bytes = policy_bytes if uses_ref and not cfg.trainer.ref_offload else 0
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
    hosts = len({d.process_index for d in mesh.devices.flat})
    programs: list[Program] = []
    want = (lambda name: True) if only is None else (lambda name: name in only)

    if want("train_step"):
        rows = cfg.trainer.mini_batch_size
        step = TrainStep(cfg, state, mesh)
        batch = _sharded(train_batch(cfg, rows, prompt, response, uses_ref, algo.needs_critic), mesh)
        mb = rows // step.num_micro(rows)
        programs.append(Program(
            "train_step", lambda: step.compiled(batch).lower(state, batch), ref_bytes,
            f"{rows} rows ({mb} per micro-batch) × {prompt}+{response} tokens",
            bytes_per_chip((state, batch))))

    rollout_rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    lp_mb = min(rollout_rows, cfg.trainer.logprob_micro_batch_size)
    lp_rows = -(-rollout_rows // lp_mb) * lp_mb  # padded to the micro-batch, as __call__ does
    lp_batch = _sharded(model_batch(lp_rows, prompt, response), mesh)
    lp_shapes = f"{lp_rows} rows ({lp_mb} per micro-batch) × {prompt}+{response} tokens"
    if want("logprobs_old"):
        old = LogProbs(cfg, state, mesh, with_entropy=True)
        params = dict(state.params)
        programs.append(Program(
            "logprobs_old", lambda: old.compiled(params, lp_batch).lower(params, lp_batch),
            state_bytes - bytes_per_chip(params) + ref_bytes, lp_shapes,
            bytes_per_chip((params, lp_batch))))
    if want("logprobs_ref") and uses_ref:
        ref = LogProbs(cfg, state, mesh)
        ref_params = {"policy": state.params["policy"]}
        programs.append(Program(
            "logprobs_ref", lambda: ref.compiled(ref_params, lp_batch).lower(ref_params, lp_batch),
            state_bytes, lp_shapes,  # the reference copy is the argument; the state stays
            bytes_per_chip((ref_params, lp_batch))))

    if any(want(n) for n in PROGRAMS if n.startswith("sampler_")):
        programs += sampler_programs(cfg, arch, mesh, want, hosts,
                                     state_bytes + ref_bytes - (policy_bytes if hosts == 1 else 0),
                                     hbm_bytes)
    return programs


def sampler_programs(cfg: Config, arch: ModelArch, mesh: Mesh, want: Callable[[str], bool],
                     hosts: int, resident: int, hbm_bytes: Optional[int] = None) -> list[Program]:
    """The sampler's prefill, insert, admit (prefill + insert, the one the engine runs) and
    decode-chunk programs on one host's mesh, for the slots and cache length the engine
    picks for this config's rollout."""
    smesh = sampler_mesh(mesh)
    model = abstract_model(arch, Numerics.from_config(cfg.model))
    engine = SamplingEngine.from_rollout_config(model, cfg.rollout, mesh=smesh, verbose=False)
    kernels = engine.kernels
    params = abstract_tree(nnx.state(model), smesh)
    requests = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt // hosts
    slots = engine.num_slots(max(1, requests))
    length = engine.cache_length(cfg.data.max_prompt_length, cfg.rollout.max_new_tokens)
    if engine.kv_cache == "paged":  # the pool the engine would size for this call
        free = None
        if hbm_bytes is not None and cfg.rollout.kv_cache_gib is None:
            # on the chips the engine takes a share of the memory left free beside the train
            # state and its weights (the abstract devices report none: it would take 4 GiB)
            free = max(0, hbm_bytes - resident - bytes_per_chip(params))
        pages = engine.pool_pages(slots, length, free_bytes=free)
        st = kernels.abstract_state(slots, length, pages)
    else:
        st = kernels.abstract_state(slots, length)
    rep = replicated(smesh)
    pb = bucket(max(1, cfg.data.max_prompt_length - 1), engine.prefill_buckets)
    bb = min(engine.prefill_batch, pow2(slots))
    tokens, lengths = _sds((bb, pb), jnp.int32, rep), _sds((bb,), jnp.int32, rep)
    where = (f"{slots} slots × {length} cache positions on {smesh.devices.size} chips; "
             f"prefill {bb} × {pb}")
    out: list[Program] = []
    if want("sampler_prefill"):
        out.append(Program("sampler_prefill",
                           lambda: kernels.prefill_jit.lower(params, tokens, lengths),
                           resident + bytes_per_chip(st), where,  # the decode state waits
                           bytes_per_chip((params, tokens, lengths))))
    if want("sampler_insert"):
        prefix = jax.eval_shape(kernels.prefill, params, tokens, lengths)
        prefix = jax.tree.map(  # laid out as the cache it is copied into
            lambda x: _sds(x.shape, x.dtype, named_sharding(smesh, CACHE_AXES, x.shape)), prefix)
        vec = _sds((slots,), jnp.int32, rep)
        keys = _sds((slots, key_width()), jnp.uint32, rep)
        out.append(Program("sampler_insert", lambda: kernels.insert_jit.lower(
            st, prefix, vec, vec, vec, vec, vec, keys), resident + bytes_per_chip(params), where,
            bytes_per_chip((st, prefix, keys)) + 5 * bytes_per_chip(vec)))
    if want("sampler_admit"):  # what the engine runs: prefill and insert in one program
        vec = _sds((slots,), jnp.int32, rep)
        seed = _sds((), jnp.uint32, rep)
        out.append(Program("sampler_admit", lambda: kernels.admit_jit.lower(
            params, st, tokens, lengths, vec, vec, vec, vec, seed, vec, vec), resident, where,
            bytes_per_chip((params, st, tokens, lengths)) + 6 * bytes_per_chip(vec)))
    if want("sampler_decode"):
        spec = SamplingSpec.of(SamplingParams.from_rollout_config(cfg.rollout, seed=0))
        stop_ids = _sds((MAX_STOP_IDS,), jnp.int32, rep)
        chunk = engine.decode_chunk
        out.append(Program("sampler_decode", lambda: kernels.decode_chunk_jit.lower(
            params, st, stop_ids, spec, chunk), resident, where + f"; chunk {chunk}",
            bytes_per_chip((params, st, stop_ids))))
    return out
