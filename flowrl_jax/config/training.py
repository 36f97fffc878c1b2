"""`algo`, `optimizer` and `trainer`: the loss, the optimizer and the RL loop around them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional

from flowrl_jax.config.check import check


@dataclass(frozen=True)
class AlgoConfig:
    """Loss selection and hyper-parameters (SPEC §1–§4)."""

    name: str = "flowrl"  # a registered algorithm: flowrl, grpo, ppo, reinforce_pp, or your own
    # FlowRL
    beta: float = 15.0
    # The reward inside FlowRL's δ: "group" = r̂, group-normalised (SPEC §3, the paper);
    # "none" = the raw reward r, so the fixed point is exactly π_ref·exp(β r) (the demo).
    reward_norm: Literal["group", "none"] = "group"
    is_clip: Literal["paper", "cap", "asym", "none"] = "cap"
    is_cap: float = 10.0
    log_w_clamp: float = 20.0  # |log w| clamp before exp (overflow guard)
    # importance weight w of the TB loss: "clipped" = exp(Σ log-ratio) through `is_clip`;
    # "one" = w ≡ 1 (the paper's "w/o importance sampling" ablation; not is_clip: none)
    importance_weight: Literal["clipped", "one"] = "clipped"
    # log Z in δ: "network" = Z_φ(x) (SPEC §2); "zero" = log Z ≡ 0, no Z-network;
    # "scalar" = one learned scalar shared by all prompts (ablations)
    log_z: Literal["network", "zero", "scalar"] = "network"
    # true: δ uses the per-token means of log πθ and log π_ref (the paper); false: their sums
    length_norm: bool = True
    # hidden blocks [Linear → GELU → LayerNorm → Dropout] before the Linear(H→1) head; the
    # paper's "3-layer MLP" (official num_layers = 3) is z_depth 2
    z_depth: int = 2
    z_dropout: float = 0.1
    detach_z_input: bool = False
    # prompt tokens Z_φ averages: all, or all but the last (the official code's slice)
    z_pool: Literal["prompt", "prompt_but_last"] = "prompt_but_last"
    # clipped surrogate (GRPO / PPO / REINFORCE++; FlowRL `paper`/`asym` reuse eps)
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28
    # GRPO KL-to-ref loss
    use_kl_loss: bool = False
    kl_coef: float = 0.001
    # PPO
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float = 0.2
    vf_coef: float = 1.0
    critic_lr: float = 1e-5
    critic_weight_decay: Optional[float] = None  # AdamW decay of the critic; None → optimizer's
    # "head": a value head on the policy trunk (shares its gradient and clip budget);
    # "model": a separate copy of the policy architecture initialised from the same
    # checkpoint, with a value head, its own AdamW (critic_lr) and grad-norm clip (veRL's)
    critic: Literal["head", "model"] = "head"
    critic_grad_clip: float = 1.0  # the separate critic's own global-norm clip (critic: model)
    # REINFORCE++
    kl_penalty_coef: float = 0.0
    kl_penalty_type: Literal["k1", "k2", "k3"] = "k1"  # in-reward KL estimator (PPO / REINFORCE++)
    # shared by the clipped-surrogate losses (algos/policy_gradient.py)
    kl_loss_type: Literal["k1", "k2", "k3"] = "k3"  # GRPO KL-to-ref loss estimator
    surrogate_clip_high: Optional[float] = None  # PPO-surrogate upper ε; None → clip_eps
    dual_clip_c: Optional[float] = None  # dual-clip PPO bound for A < 0 (e.g. 3.0); None → off
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"

    def validate(self, key: str = "algo") -> None:
        from flowrl_jax.algos import list_algorithms  # the registry is the list of valid names

        known = list_algorithms()
        check(self.name in known, f"{key}.name", f"unknown algorithm {self.name!r} (known: "
              f"{', '.join(known)})")
        check(self.beta > 0, f"{key}.beta", "must be > 0")
        check(self.surrogate_clip_high is None or self.surrogate_clip_high > 0,
              f"{key}.surrogate_clip_high", "must be > 0")
        check(self.dual_clip_c is None or self.dual_clip_c > 1, f"{key}.dual_clip_c",
              "must be > 1")
        check(self.vf_coef >= 0, f"{key}.vf_coef", "must be >= 0")
        check(self.value_clip > 0, f"{key}.value_clip", "must be > 0")
        check(self.kl_penalty_coef >= 0, f"{key}.kl_penalty_coef", "must be >= 0")
        check(self.is_cap > 0, f"{key}.is_cap", "must be > 0")
        check(self.log_w_clamp > 0, f"{key}.log_w_clamp", "must be > 0")
        check(self.z_depth >= 0, f"{key}.z_depth", "must be >= 0")
        check(0 <= self.z_dropout < 1, f"{key}.z_dropout", "must be in [0, 1)")
        check(0 < self.clip_eps < 1, f"{key}.clip_eps", "must be in (0, 1)")
        check(self.clip_eps_high > 0, f"{key}.clip_eps_high", "must be > 0")
        check(0 <= self.gamma <= 1, f"{key}.gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, f"{key}.lam", "must be in [0, 1]")
        check(self.kl_coef >= 0, f"{key}.kl_coef", "must be >= 0")
        check(self.critic_lr > 0, f"{key}.critic_lr", "must be > 0")
        check(self.critic_weight_decay is None or self.critic_weight_decay >= 0,
              f"{key}.critic_weight_decay", "must be >= 0")
        check(self.critic_grad_clip > 0, f"{key}.critic_grad_clip", "must be > 0")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then constant learning rate, global-norm clipping.

    `warmup_unit` says what `warmup_steps` counts (rl/train_state.py, `lr_scale`):
    "update" = optimizer updates, lr · min(1, (k + 1) / warmup_steps) at update k (full lr
    within the first rollout step); "rollout_step" = rollout steps as the official runs
    (torch's constant-with-warm-up scheduler stepped once per rollout step):
    lr · min(1, s / warmup_steps) for every update of rollout step s, so 0 in step 0.
    """

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    warmup_unit: Literal["update", "rollout_step"] = "update"
    grad_clip: float = 1.0
    z_lr: Optional[float] = None  # None → Z-network in the policy's optimizer at `lr`

    def validate(self, key: str = "optimizer") -> None:
        check(self.lr > 0, f"{key}.lr", "must be > 0")
        check(0 <= self.b1 < 1, f"{key}.b1", "must be in [0, 1)")
        check(0 <= self.b2 < 1, f"{key}.b2", "must be in [0, 1)")
        check(self.eps > 0, f"{key}.eps", "must be > 0")
        check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
        check(self.z_lr is None or self.z_lr > 0, f"{key}.z_lr", "must be > 0")


@dataclass(frozen=True)
class TrainerConfig:
    """The RL loop: sizes of batches, epochs, checkpoints, logging."""

    steps: int = 200  # rollout steps
    mini_batch_size: int = 256  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per accumulation step inside the jitted step
    logprob_micro_batch_size: int = 16
    epochs: int = 1  # passes over each rollout batch
    checkpoint_every: int = 10
    keep_last: int = 3
    keep_every: Optional[int] = None  # also keep every k-th step permanently
    log_every: int = 1
    # where metrics go: metrics.jsonl (always: the run's record, resumed from the checkpoint),
    # TensorBoard (OUT/tb), Weights & Biases (the `wandb` extra; WANDB_MODE, WANDB_DIR apply)
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl", "tensorboard")
    wandb_project: str = "flowrl-jax"  # the W&B project of `wandb` (the run is named after OUT)
    validate_every: int = 0  # 0 = off
    export_hf: bool = False  # write the final policy in HF format to OUT/hf
    ref_offload: bool = False  # keep reference params on host memory
    logprob_chunk: int = 1024  # sequence chunk for the chunked log-prob computation
    device_memory_gb: Optional[float] = None  # per-device budget for the memory check; None → detect
    # "grain": the Grain rollout pipeline (rl/rollout_pipeline.py); "numpy": the pre-pipeline
    # path (a thread scores, NumPy cuts mini-batches), kept to check the two stay bit-identical
    rollout_pipeline: Literal["grain", "numpy"] = "grain"
    reward_threads: Optional[int] = None  # samples scored at once by the pipeline; None → CPUs
    # bounded staleness k: the rollouts of steps s+1..s+k are generated (by policy versions
    # at most k updates old) while step s trains; 0 = on-policy, strictly in turn
    staleness: int = 0

    def validate(self, key: str = "trainer") -> None:
        check(self.steps >= 0, f"{key}.steps", "must be >= 0")
        check(self.mini_batch_size > 0, f"{key}.mini_batch_size", "must be > 0")
        check(self.micro_batch_size > 0, f"{key}.micro_batch_size", "must be > 0")
        check(self.mini_batch_size % self.micro_batch_size == 0, f"{key}.micro_batch_size",
              f"must divide mini_batch_size ({self.mini_batch_size})")
        check(self.logprob_micro_batch_size > 0, f"{key}.logprob_micro_batch_size", "must be > 0")
        check(self.epochs > 0, f"{key}.epochs", "must be > 0")
        check(self.checkpoint_every > 0, f"{key}.checkpoint_every", "must be > 0")
        check(self.keep_last > 0, f"{key}.keep_last", "must be > 0")
        check(self.keep_every is None or self.keep_every > 0, f"{key}.keep_every", "must be > 0")
        check(self.log_every > 0, f"{key}.log_every", "must be > 0")
        check("jsonl" in self.loggers, f"{key}.loggers",
              f"must include jsonl (metrics.jsonl is the run's record), got {list(self.loggers)}")
        check(len(set(self.loggers)) == len(self.loggers), f"{key}.loggers",
              f"lists a logger twice: {list(self.loggers)}")
        # third-party package, not the project's own module: is it installed at all?
        check("wandb" not in self.loggers or importlib.util.find_spec("wandb") is not None,
              f"{key}.loggers", "lists wandb but the wandb package is not installed "
              "(pip install 'flowrl-jax[wandb]')")
        check(self.validate_every >= 0, f"{key}.validate_every", "must be >= 0")
        check(self.logprob_chunk > 0, f"{key}.logprob_chunk", "must be > 0")
        check(self.device_memory_gb is None or self.device_memory_gb > 0,
              f"{key}.device_memory_gb", "must be > 0")
        check(self.rollout_pipeline in ("grain", "numpy"), f"{key}.rollout_pipeline",
              f"must be 'grain' or 'numpy', got {self.rollout_pipeline!r}")
        check(self.reward_threads is None or self.reward_threads > 0, f"{key}.reward_threads",
              "must be > 0")
        check(isinstance(self.staleness, int) and self.staleness >= 0, f"{key}.staleness",
              f"must be an integer >= 0 (0 = on-policy), got {self.staleness!r}")

