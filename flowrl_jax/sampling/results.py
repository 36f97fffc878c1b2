"""What sampling returns: generated samples (`Rollout`) and why each one ended."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: finish codes the decode kernels emit per step (0: the sample goes on)
FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
#: the `Rollout.finish_reasons` name of each final code
FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


@dataclass
class Rollout:
    """Generated samples, prompt-major (all n samples of prompt 0 first); numpy arrays."""

    prompt_index: np.ndarray  # [N] int32
    sample_index: np.ndarray  # [N] int32
    tokens: np.ndarray  # [N, max_new_tokens] int32, right-padded with 0
    logprobs: np.ndarray  # [N, max_new_tokens] float32, log_softmax(logits / T) of the sampled token
    lengths: np.ndarray  # [N] int32, generated tokens (including a final stop token)
    finish_reasons: list[str]  # "stop" | "length"

    def token_lists(self) -> list[list[int]]:
        """Generated tokens of each sample without padding."""
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]

    def logprob_lists(self) -> list[list[float]]:
        """Per-token log-probs of each sample without padding."""
        return [self.logprobs[i, :n].tolist() for i, n in enumerate(self.lengths)]
