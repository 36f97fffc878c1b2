"""Start-up memory estimate: parameter counts, per-device split, refusal with advice."""

import pytest

from flowrl_jax.config import ConfigError, load_config
import dataclasses

import jax
from flax import nnx

from flowrl_jax.memory import GiB, check_fits, estimate
from flowrl_jax.models.arch import param_count
from flowrl_jax.models.qwen2 import build_model


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_the_built_model(tied):
    arch = dataclasses.replace(load_config(None, ["model.preset=tiny"]).model.arch,
                               tie_word_embeddings=tied)
    params = nnx.state(build_model(arch), nnx.Param)
    assert param_count(arch) == sum(int(x.size) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("preset,expected", [("qwen2.5-0.5b", 494_032_768),
                                             ("qwen2.5-7b", 7_615_616_512)])
def test_param_count_of_published_models(preset, expected):
    # The published sizes of the HF checkpoints (safetensors metadata total).
    assert param_count(load_config(None, [f"model.preset={preset}"]).model.arch) == expected


def test_sharding_divides_static_memory():
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "trainer.device_memory_gb=1000"])
    one = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    eight = estimate(cfg, cfg.model.arch, {"data": 1, "fsdp": 8, "tensor": 1})
    n = 7_615_616_512
    assert one.params == n * 4 and one.optimizer == 2 * n * 4
    assert eight.params * 8 == one.params and eight.optimizer * 8 == one.optimizer
    offload = load_config(None, ["model.preset=qwen2.5-7b", "trainer.ref_offload=true"])
    assert estimate(offload, offload.model.arch, {"fsdp": 8}, (1e12, "x")).ref == 0


def test_refuses_a_config_that_cannot_fit_with_advice():
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "mesh.fsdp=1",
                             "trainer.device_memory_gb=16"])
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    msg = str(e.value)
    assert "trainer.device_memory_gb" in msg and "mesh.fsdp" in msg and "bfloat16" in msg


def test_tiny_model_fits():
    cfg = load_config(None, ["model.preset=tiny", "trainer.device_memory_gb=4"])
    est = check_fits(cfg, cfg.model.arch, {"data": 1, "fsdp": 1, "tensor": 1})
    assert 0 < est.total < 4 * GiB and "total" in est.table()


def test_multi_host_sampler_copy_is_counted():
    cfg = load_config(None, ["model.preset=qwen2.5-32b", "trainer.device_memory_gb=1000"])
    shape = {"data": 1, "fsdp": 32, "tensor": 1}
    single = estimate(cfg, cfg.model.arch, shape)
    pod = estimate(cfg, cfg.model.arch, shape, sampler_local_devices=4)
    assert pod.kv_cache - single.kv_cache == param_count(cfg.model.arch) * 4 / 4
