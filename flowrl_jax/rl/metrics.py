"""The metrics of one rollout step (the keys of a metrics.jsonl line), from its rollout,
rewards, batch, train-step metrics and timings."""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from flowrl_jax.config import Config
from flowrl_jax.rl.rollout_batch import RolloutBatch
from flowrl_jax.rl.task import PromptBatch

#: every metrics.jsonl key but `step`: `group/name`, lower_snake, a data source or set name
#: between them (`reward/gsm8k/accuracy`); old runs are read through run_files.METRIC_ALIASES
KEY_STYLE = re.compile(r"[a-z][a-z0-9_]*(/[^/\s]+)*/[a-z][a-z0-9_]*")
#: train-step metric (an algorithm's own name) → the name it is reported under
RENAMED = {"kl_ref": "kl/ref", "kl_old": "kl/old", "step": "optimizer/step",
           "skipped": "optimizer/skipped_frac", "lr": "optimizer/lr",
           "grad_norm": "optimizer/grad_norm", "entropy": "entropy/train",
           "loss": "loss/total", "pg_loss": "loss/policy", "vf_loss": "loss/value",
           "kl_loss": "loss/kl", "kl_penalty": "kl/penalty",
           "delta_mean": "flowrl/delta_mean", "delta_std": "flowrl/delta_std",
           "log_z_mean": "flowrl/log_z_mean", "w_mean": "flowrl/w_mean",
           "log_w_mean": "flowrl/log_w_mean", "clip_frac": "flowrl/clip_frac",
           "rhat_mean": "flowrl/rhat_mean", "pg_clip_frac": "policy/clip_frac",
           "pg_clip_frac_lower": "policy/clip_frac_lower", "ratio_mean": "policy/ratio_mean",
           "adv_mean": "policy/adv_mean", "vf_clip_frac": "value/clip_frac",
           "value_mean": "value/mean"}
#: train-step metrics that are not reported (counts of one update; reported per step instead)
DROPPED = {"response_length", "num_seqs", "num_tokens", "skipped_total", "tokens", "seqs",
           "input_tokens"}


def _reported_name(key: str) -> str:
    if key.startswith("grad_norm_"):  # per model role: grad_norm_policy, grad_norm_z, ...
        return f"optimizer/{key}"
    return RENAMED.get(key, key)


def mean_over_updates(ms: list[dict]) -> dict[str, float]:
    """Mean over mini-batch updates of each scalar train-step metric (renamed for reports)."""
    out: dict[str, float] = {}
    keys = sorted({k for m in ms for k in m})
    for k in keys:
        if k in DROPPED:
            continue
        vals = [float(np.asarray(m[k])) for m in ms if k in m and np.asarray(m[k]).size == 1]
        if vals:
            out[_reported_name(k)] = float(np.mean(vals))
    return out


def staleness_metrics(step: int, versions: list[np.ndarray]) -> dict[str, float]:
    """How stale each mini-batch of rollout step `step` was (the step minus the policy version
    that generated its rows): the mean over mini-batches of their mean, and the largest."""
    per_batch = [np.asarray(step - v, np.float64) for v in versions if np.size(v)]
    if not per_batch:
        return {}
    return {"rollout/staleness_mean": float(np.mean([b.mean() for b in per_batch])),
            "rollout/staleness_max": float(max(b.max() for b in per_batch))}


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sum(x * mask) / max(mask.sum(), 1.0))


def step_metrics(cfg: Config, batch: PromptBatch, ro: Any, rewards: np.ndarray,
                 data: RolloutBatch, train_metrics: list[dict], times: dict[str, float], *,
                 skipped_total: int, n_params: int, uses_ref: bool, peak_flops: Optional[float],
                 device_count: int) -> dict[str, Any]:
    """The metrics of one rollout step (`peak_flops` None or 0: no MFU)."""
    m: dict[str, Any] = {}
    m["reward/mean"] = float(np.mean(rewards))
    m["reward/std"] = float(np.std(rewards))
    m["reward/max"] = float(np.max(rewards))
    m["reward/min"] = float(np.min(rewards))
    m["reward/accuracy"] = float(np.mean(rewards > 0))
    sources = np.asarray([batch.data_source[int(p)] for p in ro.prompt_index])
    for s in sorted(set(sources.tolist())):
        sel = sources == s
        m[f"reward/{s}/mean"] = float(np.mean(rewards[sel]))
        m[f"reward/{s}/accuracy"] = float(np.mean(rewards[sel] > 0))
    if data.rhat is not None:
        rh = np.asarray(data.rhat)
        m["rhat/mean"], m["rhat/std"] = float(np.mean(rh)), float(np.std(rh))
        m["rhat/abs_max"] = float(np.max(np.abs(rh)))
    g = cfg.rollout.samples_per_prompt
    if g > 1:
        r = rewards.reshape(-1, g)
        m["reward/frac_groups_all_equal"] = float(np.mean(np.all(r == r[:, :1], axis=1)))
    lengths = np.asarray(ro.lengths)
    m["response_length/mean"] = float(np.mean(lengths))
    m["response_length/max"] = float(np.max(lengths))
    m["response_length/min"] = float(np.min(lengths))
    m["response_length/truncated_frac"] = float(np.mean(
        np.asarray(ro.finish_reasons) == "length"))
    m["prompt_length/mean"] = float(np.mean([len(p) for p in batch.prompts]))
    mask = data.response_mask.astype(np.float32)
    m["entropy/rollout"] = _masked_mean(data.entropy, mask)
    # sampler vs trainer log-probs of the same tokens (same params: ~0 up to numerics)
    m["rollout/logp_abs_diff"] = _masked_mean(np.abs(data.sampler_logp - data.old_logp), mask)
    m.update(mean_over_updates(train_metrics))
    m["optimizer/updates"] = len(train_metrics)
    m["optimizer/skipped_total"] = int(skipped_total)
    for k, v in times.items():
        m[f"time/{k}"] = v
    total = sum(times.values())
    m["time/step"] = total
    tokens = float(np.sum(lengths)) + float(np.sum(data.prompt_mask))
    m["throughput/tokens_per_s"] = tokens / max(total, 1e-9)
    m["throughput/response_tokens"] = float(np.sum(lengths))
    if peak_flops:
        # forward+backward per epoch (6N) + old/ref log-prob passes (2N each) + sampling (2N)
        passes = 6 * cfg.trainer.epochs + 2 * (2 if uses_ref else 1) + 2
        m["perf/mfu"] = passes * n_params * tokens / (total * peak_flops * device_count)
    return m
