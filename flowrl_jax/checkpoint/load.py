"""A sharded policy model from wherever it lives: the one place models are loaded or made.

A model path is a Hugging Face directory (config.json + safetensors), an Orbax checkpoint
directory (model.json, see checkpoint/orbax.py) or a training run directory
(RUN/checkpoints). Without a path the model is a random initialisation of an architecture,
created directly in its shardings. Used by the trainer, sample, eval, serve, bench and demo.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional, Union

import jax
from flax import nnx
from jax.sharding import Mesh

from flowrl_jax.checkpoint import hf, orbax
from flowrl_jax.checkpoint.safetensors_io import CheckpointError
from flowrl_jax.config import ConfigError, ModelArch, ModelConfig
from flowrl_jax.mesh import single_device_mesh, state_shardings
from flowrl_jax.models.qwen2 import Numerics, Qwen2ForCausalLM, abstract_model, dtype_of
from flowrl_jax.paths import is_url

PathLike = Union[str, os.PathLike]


def model_kind(path: PathLike) -> tuple[str, Path]:
    """('hf' | 'orbax', directory) for a model path; a clear error when it is neither."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: model path does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a directory (HF model, Orbax checkpoint or run dir)")
    if (p / orbax.MODEL_JSON).is_file():
        return "orbax", p
    if (p / orbax.RUN_CHECKPOINTS / orbax.MODEL_JSON).is_file():
        return "orbax", p / orbax.RUN_CHECKPOINTS
    if (p / "config.json").is_file():
        return "hf", p
    raise CheckpointError(f"{p}: neither a Hugging Face model (config.json), an Orbax checkpoint "
                          f"(model.json) nor a training run (checkpoints/model.json)")


def arch_from_config(cfg: ModelConfig) -> ModelArch:
    """The architecture from model.arch/preset or the checkpoint's config (weight file headers
    checked, no weights read); errors are ConfigErrors naming the model key."""
    if cfg.path is None:
        if cfg.arch is None:
            raise ConfigError("model: set model.path (a HF or Orbax checkpoint) or model.preset")
        return cfg.arch
    if not is_url(cfg.path) and not Path(cfg.path).exists():
        raise ConfigError(f"model.path: {cfg.path!r} does not exist")
    try:
        kind, d = model_kind(cfg.path)
        if kind == "hf":
            arch = hf.read_arch(d)
            hf.index_tensors(d)  # every weight file's header, so garbage fails before compute
            return arch
        return orbax.read_model_json(orbax.resolve_checkpoint_dir(d))[0]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - report any unreadable model dir by key
        raise ConfigError(f"model.path: cannot read {cfg.path!r}: {e}") from e


def _numerics(cfg: Union[ModelConfig, Numerics, None]) -> Optional[Numerics]:
    if cfg is None or isinstance(cfg, Numerics):
        return cfg
    return Numerics.from_config(cfg)


def load_model(path: PathLike, mesh: Mesh, cfg: Union[ModelConfig, Numerics, None] = None, *,
               step: Optional[int] = None) -> tuple[Qwen2ForCausalLM, ModelArch, Optional[Path]]:
    """(model with params sharded on `mesh`, arch, tokenizer dir or None) from a model path.

    `cfg` None keeps the stored parameter dtype (and computes in it); `step` picks an Orbax step.
    """
    kind, d = model_kind(path)
    num = _numerics(cfg)
    if kind == "hf":
        if num is None:  # keep the checkpoint's own dtype (a bf16 model stays bf16)
            dt = dtype_of(hf.checkpoint_dtype(d))
            num = Numerics(param_dtype=dt, compute_dtype=dt)
        model, arch = hf.load_hf(d, mesh, num)
        return model, arch, (d if hf.has_tokenizer(d) else None)
    model, arch = orbax.restore_policy(d, mesh, num, step)
    return model, arch, orbax.checkpoint_tokenizer_dir(d)


@functools.lru_cache(maxsize=8)
def _sharded_init(arch: ModelArch, num: Numerics, mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
    # One compiled initialiser per (arch, numerics, mesh). The key is an argument, not a
    # constant: new seeds do not recompile, and with a constant key every random draw is a
    # constant expression that XLA:GPU spent minutes folding (1.5B model).
    graphdef, abstract = nnx.split(abstract_model(arch, num))
    shardings = state_shardings(abstract, mesh)

    @jax.jit
    def make(key: jax.Array) -> nnx.State:
        with nnx.use_eager_sharding(False):
            state = nnx.state(Qwen2ForCausalLM(arch, num, rngs=nnx.Rngs(key)))
        return jax.lax.with_sharding_constraint(state, shardings)

    return graphdef, make


def random_model(arch: ModelArch, numerics: Optional[Numerics], mesh: Mesh,
                 seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised model created directly in its shardings on `mesh`."""
    arch.validate()
    graphdef, make = _sharded_init(arch, numerics or Numerics(), mesh)
    return nnx.merge(graphdef, make(jax.random.key(seed)))


def model_from_config(cfg: ModelConfig, mesh: Mesh) -> tuple[Qwen2ForCausalLM, ModelArch, Optional[Path]]:
    """The policy a ModelConfig describes: `path` when set, else a random `arch`/preset model."""
    if cfg.path:
        return load_model(cfg.path, mesh, cfg)
    if cfg.arch is None:
        raise CheckpointError("model: set model.path, model.preset or model.arch")
    return random_model(cfg.arch, Numerics.from_config(cfg), mesh, cfg.seed), cfg.arch, None


def load_for_sampling(path: str, mesh: Optional[Mesh] = None,
                      model_cfg: Optional[ModelConfig] = None
                      ) -> tuple[Qwen2ForCausalLM, ModelArch, Optional[str]]:
    """(model, arch, tokenizer_dir or None) for sample/serve/eval: one device unless `mesh`."""
    model_cfg = model_cfg or ModelConfig(path=path)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    model, arch, tok = load_model(str(p), mesh or single_device_mesh(), model_cfg)
    return model, arch, (str(tok) if tok else None)
