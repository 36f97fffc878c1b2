"""Sampling of one rollout step: this host's prompts → the sampler → the global rollout
(gathered so every host holds the same one) → the padded `RolloutBatch`."""

from __future__ import annotations

from typing import Any

import numpy as np

from flowrl_jax.config import Config
from flowrl_jax.distributed import gather_json, gather_rows
from flowrl_jax.rl.rollout_batch import RolloutBatch, bucket, build_rollout_batch
from flowrl_jax.rl.task import PromptBatch
from flowrl_jax.sampling.engine import Rollout


def gather_rollout(batch: PromptBatch, ro: Rollout, process_count: int
                   ) -> tuple[PromptBatch, Rollout]:
    """Every host's prompts and rollout, concatenated in process order (prompt indices
    shifted to the global batch); on one process the arguments themselves."""
    if process_count == 1:
        return batch, ro
    parts = gather_json({"p": batch.prompts, "g": batch.ground_truth, "d": batch.data_source,
                         "e": batch.extra, "pi": ro.prompt_index.tolist(),
                         "si": ro.sample_index.tolist(), "len": ro.lengths.tolist(),
                         "fr": list(ro.finish_reasons)})
    toks, lps = gather_rows(ro.tokens), gather_rows(ro.logprobs)
    gb, offset, pidx = None, 0, []
    for d in parts:
        b = PromptBatch(d["p"], d["g"], d["d"], d["e"])
        pidx.extend(int(i) + offset for i in d["pi"])
        offset += len(b)
        gb = b if gb is None else gb.concat(b)
    cat = lambda key: [x for d in parts for x in d[key]]  # noqa: E731
    return gb, Rollout(np.asarray(pidx, np.int32), np.asarray(cat("si"), np.int32), toks, lps,
                       np.asarray(cat("len"), np.int32), cat("fr"))


def gather_rewards(rewards: np.ndarray, process_count: int) -> np.ndarray:
    """This host's rewards → the global batch's, in process order."""
    if process_count == 1:
        return rewards
    return np.asarray([r for part in gather_json(rewards.tolist()) for r in part], np.float32)


def to_rollout_batch(cfg: Config, batch: PromptBatch, ro: Rollout) -> RolloutBatch:
    """The rollout padded to length buckets (rewards 0 until scored)."""
    buckets = cfg.data.length_buckets
    longest_prompt = max(len(p) for p in batch.prompts)
    plen = bucket(longest_prompt, buckets, max(cfg.data.max_prompt_length, longest_prompt))
    rlen = response_bucket(cfg, ro)
    return build_rollout_batch(batch.prompts, ro.prompt_index, ro.tokens, ro.lengths,
                               np.zeros(len(ro.lengths), np.float32), plen, rlen,
                               sampler_logp=ro.logprobs)


def response_bucket(cfg: Config, ro: Any) -> int:
    """The padded response length of a rollout: the bucket of its longest response."""
    return bucket(max(int(np.max(ro.lengths)), 1), cfg.data.length_buckets,
                  cfg.rollout.max_new_tokens)
