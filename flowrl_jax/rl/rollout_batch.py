"""The rollout batch: one rollout step's training arrays, from sampler output to the train step.

`RolloutBatch` documents the layout once; `build_rollout_batch` pads a sampler rollout into
it, `minibatches` cuts the seeded shuffle of one step into fixed-size mini-batches whose
response length is cut to a bucket, so the jitted functions see few distinct shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from flax import struct

Array = Any  # host numpy arrays (jax arrays work the same)

#: the arrays the model pass reads (the log-prob pass and the train step)
MODEL_KEYS = ("input_ids", "attention_mask", "response_mask")
#: what the algorithm's `advantages` reads
ADVANTAGE_KEYS = ("response_mask", "old_logp", "ref_logp", "rewards", "group_ids", "old_values",
                  "seq_mask")
#: what the train step reads besides MODEL_KEYS
UPDATE_KEYS = ("old_logp", "ref_logp", "rhat", "advantages", "returns", "old_values", "rewards",
               "group_ids", "seq_mask")


@struct.dataclass
class RolloutBatch:
    """N = prompts × G rows, prompt-major; row i is prompt ++ response, T = P + R columns.

    P and R are length buckets. Prompts are LEFT-padded to P, responses RIGHT-padded to R;
    prompt and response are joined once, here, so mini-batches only slice.

    Set when the batch is built (`build_rollout_batch`):
      input_ids      [N, T] int32    prompt tokens in [:, :P], response tokens in [:, P:]
                                     (padding is pad_id)
      attention_mask [N, T] int32    1 on real tokens (prompt and response), 0 on padding;
                                     [:, :P] is the valid-prompt mask Z_φ pools over
      response_mask  [N, R] int32    1 on response tokens that count in the loss (the stop
                                     token counts); R is read from its shape, so P = T − R
      group_ids      [N] int32       index of the row's prompt (its G samples share it)
      rewards        [N] float32     scalar outcome reward from the task
      seq_mask       [N] int32       0 marks padding rows added to fill a mini-batch
      sampler_logp   [N, R] float32  the sampler's log-probs of its tokens (0 off the mask):
                                     the behaviour log-probs of asynchronous rollouts
      policy_version [N] int32       the policy version that generated the row (staleness =
                                     the rollout step − it; 0 on padding rows)
    Set by the log-prob pass (rl/step_fns.py), zero off the response mask:
      old_logp [N, R] float32        log π under the current params (the sampling policy);
                                     with staleness ≥ 1 the trainer sets it to sampler_logp
      entropy  [N, R] float32        policy entropy per token (logged only)
      old_values [N, R] float32      critic values (PPO)
      ref_logp [N, R] float32        log π_ref under the frozen initial params (when used)
    Set by the algorithm's `advantages` (algos/), over the whole batch:
      rhat [N]                       normalised reward (FlowRL, GRPO)
      advantages [N, R], returns [N, R]   the surrogate family (GRPO, PPO, REINFORCE++)
    Fields not computed for a run are None.
    """

    input_ids: Array
    attention_mask: Array
    response_mask: Array
    group_ids: Array
    rewards: Array
    seq_mask: Array
    sampler_logp: Optional[Array] = None
    policy_version: Optional[Array] = None
    old_logp: Optional[Array] = None
    entropy: Optional[Array] = None
    old_values: Optional[Array] = None
    ref_logp: Optional[Array] = None
    rhat: Optional[Array] = None
    advantages: Optional[Array] = None
    returns: Optional[Array] = None

    # ----------------------------------------------------------------- views

    @property
    def rows(self) -> int:
        """N, the number of sequences."""
        return int(self.input_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        """P, the padded prompt length."""
        return int(self.input_ids.shape[1] - self.response_mask.shape[1])

    @property
    def prompt_ids(self) -> Array:
        """[N, P] the left-padded prompts."""
        return self.input_ids[:, :self.prompt_len]

    @property
    def prompt_mask(self) -> Array:
        """[N, P] 1 on real prompt tokens."""
        return self.attention_mask[:, :self.prompt_len]

    @property
    def response_ids(self) -> Array:
        """[N, R] the right-padded responses."""
        return self.input_ids[:, self.prompt_len:]

    def as_dict(self) -> dict[str, Array]:
        """Every field that is set, by name (the mapping the pure algorithm functions take)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def select(self, keys: Sequence[str]) -> dict[str, Array]:
        """The fields among `keys` that are set, by name."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def model_inputs(self) -> dict[str, Array]:
        """What the log-prob pass reads."""
        return self.select(MODEL_KEYS)

    def train_inputs(self) -> dict[str, Array]:
        """What the train step reads."""
        return self.select(MODEL_KEYS + UPDATE_KEYS)

    def with_arrays(self, arrays: Mapping[str, Array]) -> "RolloutBatch":
        """A copy with fields set from `arrays`; an unknown name is an error naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(arrays) - names)
        if unknown:
            raise KeyError(f"RolloutBatch has no field {unknown[0]!r} (fields: {sorted(names)})")
        return self.replace(**arrays)

    # ----------------------------------------------------------------- cuts

    def take_rows(self, rows: np.ndarray, size: int) -> "RolloutBatch":
        """Rows `rows` of every array, padded with all-zero (masked) rows up to `size` rows."""
        pad = size - len(rows)

        def take(v: Array) -> Array:
            x = v[rows]
            if pad > 0:
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
            return x

        return self.replace(**{k: take(v) for k, v in self.as_dict().items()})

    def trim_response(self, length: int) -> "RolloutBatch":
        """Cut the response to its first `length` columns (every [N, R] array and the
        response part of the [N, T] ones)."""
        r, t = self.response_mask.shape[1], self.input_ids.shape[1]
        cut = {}
        for k, v in self.as_dict().items():
            if v.ndim == 2 and v.shape[1] == t and k in ("input_ids", "attention_mask"):
                cut[k] = v[:, :t - r + length]
            elif v.ndim == 2 and v.shape[1] == r:
                cut[k] = v[:, :length]
        return self.replace(**cut)


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
                        pad_id: int = 0) -> RolloutBatch:
    """The padded arrays of one rollout (see `RolloutBatch`)."""
    n = len(prompt_index)
    pids, pmask = pad_prompts([prompts[int(p)] for p in prompt_index], prompt_len, pad_id)
    r = min(response_len, tokens.shape[1])
    rids = np.full((n, response_len), pad_id, np.int32)
    rids[:, :r] = tokens[:, :r]
    rmask = (np.arange(response_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    rids = np.where(rmask > 0, rids, pad_id).astype(np.int32)
    lp = None
    if sampler_logp is not None:
        lp = np.zeros((n, response_len), np.float32)
        lp[:, :r] = sampler_logp[:, :r]
        lp = lp * rmask
    return RolloutBatch(
        input_ids=np.concatenate([pids, rids], axis=1),
        attention_mask=np.concatenate([pmask, rmask], axis=1),
        response_mask=rmask, group_ids=np.asarray(prompt_index, np.int32),
        rewards=np.asarray(rewards, np.float32), seq_mask=np.ones((n,), np.int32),
        sampler_logp=lp)


def minibatches(batch: RolloutBatch, size: int, rng: np.random.Generator,
                buckets: Sequence[int], max_response: int, shuffle: bool = True
                ) -> Iterator[RolloutBatch]:
    """Shuffled mini-batches of exactly `size` rows, response length cut to a bucket."""
    n = batch.rows
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, size):
        mb = batch.take_rows(order[start:start + size], size)
        longest = int(mb.response_mask.sum(axis=1).max(initial=1))
        yield mb.trim_response(bucket(max(longest, 1), buckets, max_response))
