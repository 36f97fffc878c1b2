"""Rollouts → padded training arrays, and the seeded shuffle / mini-batch cut of one step.

Layout of a rollout batch (host numpy, N = prompts × G rows, prompt-major):
  prompt_ids [N, P] left-padded, prompt_mask [N, P]; response_ids [N, R] right-padded,
  response_mask [N, R] (the stop token counts as a response token); group_ids [N];
  rewards [N]; seq_mask [N] (0 marks padding rows added to fill a mini-batch).
P and R are length buckets, so the jitted functions see few distinct shapes.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

TOKEN_KEYS = ("response_ids", "response_mask", "old_logp", "ref_logp", "old_values",
              "advantages", "returns", "sampler_logp")


def bucket(n: int, buckets: Sequence[int], cap: int) -> int:
    """Smallest bucket ≥ n among `buckets` below `cap`, and `cap` itself."""
    for b in sorted({int(b) for b in buckets if b < cap} | {int(cap)}):
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the maximum {cap}")


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to [n, length] ids and mask (longer prompts keep their tail)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]
        if p:
            ids[i, length - len(p):] = p
            mask[i, length - len(p):] = 1
    return ids, mask


def build_rollout_batch(prompts: Sequence[Sequence[int]], prompt_index: np.ndarray,
                        tokens: np.ndarray, lengths: np.ndarray, rewards: np.ndarray,
                        prompt_len: int, response_len: int, sampler_logp: np.ndarray | None = None,
                        pad_id: int = 0) -> dict[str, np.ndarray]:
    """The padded arrays of one rollout (see module docstring)."""
    n = len(prompt_index)
    pids, pmask = pad_prompts([prompts[int(p)] for p in prompt_index], prompt_len, pad_id)
    r = min(response_len, tokens.shape[1])
    rids = np.full((n, response_len), pad_id, np.int32)
    rids[:, :r] = tokens[:, :r]
    rmask = (np.arange(response_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    rids = np.where(rmask > 0, rids, pad_id).astype(np.int32)
    out = {
        "prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids, "response_mask": rmask,
        "group_ids": np.asarray(prompt_index, np.int32), "rewards": np.asarray(rewards, np.float32),
        "seq_mask": np.ones((n,), np.int32),
    }
    if sampler_logp is not None:
        lp = np.zeros((n, response_len), np.float32)
        lp[:, :r] = sampler_logp[:, :r]
        out["sampler_logp"] = lp * rmask
    return out


def take_rows(batch: dict[str, np.ndarray], rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Rows `rows` of every array, padded with all-masked rows up to `size` rows."""
    out = {}
    pad = size - len(rows)
    for k, v in batch.items():
        x = v[rows]
        if pad > 0:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        out[k] = x
    return out


def trim_response(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Cut every [N, R] token array to [N, length]."""
    return {k: (v[:, :length] if k in TOKEN_KEYS and v.ndim == 2 else v) for k, v in batch.items()}


def minibatches(batch: dict[str, np.ndarray], size: int, rng: np.random.Generator,
                buckets: Sequence[int], max_response: int, shuffle: bool = True
                ) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled mini-batches of exactly `size` rows, response length cut to a bucket."""
    n = len(batch["rewards"])
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, size):
        rows = order[start:start + size]
        mb = take_rows(batch, rows, size)
        longest = int(mb["response_mask"].sum(axis=1).max(initial=1))
        yield trim_response(mb, bucket(max(longest, 1), buckets, max_response))


def chunks(batch: dict[str, np.ndarray], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Consecutive row chunks of exactly `size` rows (the last padded), with their start row."""
    n = len(batch["rewards"])
    for start in range(0, n, size):
        rows = np.arange(start, min(start + size, n))
        yield start, take_rows(batch, rows, size)
