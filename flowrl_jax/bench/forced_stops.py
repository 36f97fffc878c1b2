"""Stop tokens that make samples finish at chosen lengths, through the sampler's public API.

Samples depend only on the seed (sampling/random.py), so a first run without stops shows
each sample's full token stream; a stop set holding the token sample i drew at position
L_i - 1 ends it there, provided that token appears nowhere earlier in any stream (else it
would end another sample early). Positions whose token fails that are skipped, moving back
from L_i - 1 towards L_i / 2; a sample with no usable token runs to the cap.
"""

from __future__ import annotations

import numpy as np


def stream_lengths(tokens: np.ndarray, stops: set[int]) -> np.ndarray:
    """Tokens each stream [rows, cap] emits with `stops`: up to and including the first
    stop token, or the whole stream."""
    hit = np.isin(tokens, np.fromiter(stops, np.int64, len(stops))) if stops else \
        np.zeros(tokens.shape, bool)
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int64)


def forced_stops(tokens: np.ndarray, targets: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """(stop ids, the lengths they give) for streams `tokens` [rows, cap] and wanted
    `targets` [rows] in 1..cap."""
    rows, cap = tokens.shape
    first_seen: dict[int, int] = {}  # token → earliest position in any stream
    for pos in range(cap - 1, -1, -1):  # last write wins: the earliest position stays
        for tok in tokens[:, pos].tolist():
            first_seen[tok] = pos
    stops: set[int] = set()
    for i in np.argsort(-np.asarray(targets), kind="stable").tolist():
        want = int(targets[i])
        if want >= cap:
            continue  # runs to the cap without a stop
        for pos in range(want - 1, max(want // 2, 1) - 2, -1):
            tok = int(tokens[i, pos])
            # nowhere earlier, in no other stream at this position: it ends stream i only
            if first_seen[tok] == pos and int((tokens[:, pos] == tok).sum()) == 1:
                stops.add(tok)
                break
    return tuple(sorted(stops)), stream_lengths(tokens, stops)


def padded(stops: tuple[int, ...], width: int, vocab_size: int) -> tuple[int, ...]:
    """`stops` filled up to `width` ids with ids outside the vocabulary, which are never drawn:
    runs with and without real stops then pass stop arrays of one width (one compiled decode)."""
    return tuple(stops) + tuple(range(vocab_size, vocab_size + width - len(stops)))
