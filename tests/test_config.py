"""config/: YAML with includes and dotted overrides; errors name the key; HF config parsing."""

from __future__ import annotations

import dataclasses

import pytest

from flowrl_jax.config import (Config, ConfigError, ModelArch, config_from_dict, config_to_dict,
                               load_config)


def write(path, text):
    path.write_text(text)
    return path


def test_yaml_include_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "algo: {name: grpo, beta: 5}\noptimizer: {lr: 1.0e-5}\n"
                                  "rollout: {samples_per_prompt: 4}\n")
    write(tmp_path / "mid.yaml", "include: base.yaml\nalgo: {beta: 10}\n")
    cfg_file = write(tmp_path / "run.yaml",
                     "include: [mid.yaml, mesh/cpu.yaml]\nalgo: {name: flowrl}\nseed: 3\n")
    cfg = load_config(cfg_file, ["optimizer.lr=2e-6", "rollout.stop_token_ids=[1, 2]",
                                 "model.preset=tiny", "trainer.export_hf=true"])
    assert cfg.algo.name == "flowrl" and cfg.algo.beta == 10.0  # file wins over includes
    assert cfg.rollout.samples_per_prompt == 4 and cfg.seed == 3
    assert cfg.optimizer.lr == 2e-6  # override wins; YAML's "2e-6" string is read as a number
    assert cfg.rollout.stop_token_ids == (1, 2) and cfg.trainer.export_hf is True
    assert cfg.mesh.fsdp == -1  # from the packaged configs/mesh/cpu.yaml
    assert cfg.model.arch.hidden_size == 64  # preset resolved from configs/models/tiny.yaml
    assert config_from_dict(config_to_dict(cfg)) == cfg  # a saved config reloads identically


def test_arch_keys_refine_a_preset_and_a_named_preset_replaces_the_files_arch():
    """`model.preset=X model.arch.num_hidden_layers=N` is X's width at N layers (it used to
    fall back to the dataclass defaults), and a preset named on the command line replaces the
    architecture a file spells out (demo.yaml) instead of being ignored."""
    cut = load_config(None, ["model.preset=qwen2.5-7b", "model.arch.num_hidden_layers=2"])
    full = load_config(None, ["model.preset=qwen2.5-7b"]).model.arch
    assert cut.model.arch.num_hidden_layers == 2 and full.num_hidden_layers == 28
    assert cut.model.arch == dataclasses.replace(full, num_hidden_layers=2)
    assert cut.model.arch.hidden_size == 3584 != ModelArch().hidden_size
    demo = load_config("configs/demo.yaml").model.arch
    named = load_config("configs/demo.yaml", ["model.preset=qwen2.5-7b"]).model.arch
    assert named == full and demo != full
    assert load_config("configs/demo.yaml", ["model.preset=qwen2.5-7b",
                                             "model.preset=null"]).model.arch == demo
    # a file that names a preset and some arch keys: the keys refine the preset
    assert config_from_dict({"model": {"preset": "qwen2.5-7b",
                                       "arch": {"num_hidden_layers": 2}}}).model.arch == cut.model.arch


@pytest.mark.parametrize("overrides, key", [
    (["algo.betta=3"], "algo.betta: unknown key"),
    (["nosuchsection.x=1"], "nosuchsection: unknown key"),
    (["algo.beta=high"], "algo.beta: expected a number"),
    (["trainer.steps=1.5"], "trainer.steps: expected an integer"),
    (["trainer.export_hf=maybe"], "trainer.export_hf: expected true/false"),
    (["algo.is_clip=always"], "algo.is_clip: 'always' is not one of"),
    (["algo.name=dpo"], "algo.name"),
    (["algo.beta=-1"], "algo.beta: must be > 0"),
    (["rollout.top_p=1.5"], "rollout.top_p: must be in (0, 1]"),
    (["trainer.mini_batch_size=10", "trainer.micro_batch_size=4"], "trainer.micro_batch_size: must divide"),
    (["mesh.fsdp=-1", "mesh.data=-1"], "mesh: at most one axis may be -1"),
    (["model.preset=gpt5"], "model.preset: unknown preset 'gpt5'"),
    (["model.arch.num_key_value_heads=3", "model.arch.num_attention_heads=4",
      "model.arch.hidden_size=64", "model.arch.vocab_size=8", "model.arch.intermediate_size=8",
      "model.arch.num_hidden_layers=1"], "model.arch.num_key_value_heads"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "bad.yaml", "algo: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["algo.beta"])


HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128,
      "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
      "tie_word_embeddings": True, "max_position_embeddings": 256, "eos_token_id": [2, 3]}


def test_hf_config_both_rope_spellings():
    old = ModelArch.from_hf_dict({**HF, "rope_theta": 1e6})
    new = ModelArch.from_hf_dict({**HF, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert old.rope_theta == 1e6 and new.rope_theta == 5e5
    assert old.eos_token_id == 2 and old.resolved_head_dim == 16
    # our own export writes both; reading it back gives the same arch
    assert ModelArch.from_hf_dict(new.to_hf_dict()) == dataclasses.replace(new, head_dim=16)
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        ModelArch.from_hf_dict({**HF, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}})
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelArch.from_hf_dict({**HF, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_defaults_validate():
    Config().validate()


# --------------------------------------------------------------------------- paper configs


def test_paper_configs_official_warmup_and_z_network():
    cfg = load_config("qwen2.5-7b-math.yaml")
    assert cfg.optimizer.warmup_unit == "rollout_step" and cfg.optimizer.warmup_steps == 10
    assert cfg.algo.z_depth == 2 and cfg.algo.z_pool == "prompt_but_last"
    assert (cfg.algo.importance_weight, cfg.algo.log_z, cfg.algo.length_norm) == (
        "clipped", "network", True)
    # the code defaults keep the behaviour of before
    d = Config()
    assert d.optimizer.warmup_unit == "update" and d.algo.dual_clip_c is None
    assert d.algo.value_clip == 0.2 and d.algo.critic_weight_decay is None
    assert d.algo.critic == "head" and cfg.algo.critic == "model"  # the paper configs' PPO


BASELINES = {
    "grpo": dict(dual_clip_c=3.0, use_kl_loss=True, kl_coef=0.001, kl_loss_type="k3"),
    "ppo": dict(dual_clip_c=3.0, value_clip=0.5, critic_weight_decay=0.01, critic="model"),
    "reinforce_pp": dict(dual_clip_c=3.0),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_configs_carry_the_paper_era_verl_settings(name):
    from flowrl_jax.rl.train_state import role_weight_decays

    cfg = load_config(f"baselines/qwen2.5-7b-math-{name}.yaml")
    paper = load_config("qwen2.5-7b-math.yaml")
    assert cfg.algo.name == name
    for k, v in BASELINES[name].items():
        assert getattr(cfg.algo, k) == v, k
    # everything else is the FlowRL recipe: data, batch, optimizer (official warm-up), model;
    # the sampler's slots per host and its KV cache are memory settings, not the recipe (PPO's
    # critic model needs fewer slots and the checked dense cache to fit v5p HBM beside it)
    for section in ("data", "rollout", "optimizer", "trainer", "model", "mesh"):
        ours = getattr(cfg, section)
        if section == "rollout":
            memory = ("decode_slots", "kv_cache", "kv_cache_gib", "paged_attention")
            ours = dataclasses.replace(ours, **{k: getattr(paper.rollout, k) for k in memory})
        assert ours == getattr(paper, section), section
    wds = role_weight_decays(cfg)
    assert wds["policy"] == 0.1 and wds["value"] == (0.01 if name == "ppo" else 0.1)


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.warmup_unit=epoch"], "optimizer.warmup_unit: 'epoch' is not one of"),
    (["algo.importance_weight=none"], "algo.importance_weight: 'none' is not one of"),
    (["algo.log_z=learned"], "algo.log_z: 'learned' is not one of"),
    (["algo.length_norm=sometimes"], "algo.length_norm: expected true/false"),
    (["algo.z_pool=last"], "algo.z_pool: 'last' is not one of"),
    (["algo.critic_weight_decay=-0.1"], "algo.critic_weight_decay: must be >= 0"),
    (["algo.critic=separate"], "algo.critic: 'separate' is not one of"),
    (["algo.critic_grad_clip=0"], "algo.critic_grad_clip: must be > 0"),
])
def test_new_switches_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)


def test_the_package_exports_every_name_callers_import():
    """flowrl_jax.config is a package of modules; the names callers import stay at its top."""
    import flowrl_jax.config as config

    names = {"ATTENTION", "CONFIG_DIR", "DTYPES", "REMAT", "AlgoConfig", "Config", "ConfigError",
             "DataConfig", "DatasetSpec", "EvalConfig", "MeshConfig", "ModelArch", "ModelConfig",
             "OptimizerConfig", "RewardsConfig", "RolloutConfig", "SandboxSettings",
             "TrainerConfig", "apply_overrides", "build_dataclass", "config_from_dict",
             "config_to_dict", "load_config", "load_yaml_tree", "preset_arch", "preset_tree",
             "remat_policy_name", "replace", "resolve_config_path"}
    assert set(config.__all__) == names and all(hasattr(config, n) for n in names)
    assert (config.CONFIG_DIR / "models").is_dir()  # the packaged configs/, one level up
