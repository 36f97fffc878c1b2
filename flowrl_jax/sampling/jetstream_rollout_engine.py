"""The JetStream side of rollouts (sampling/jetstream_rollout.py drives them): `RolloutEngine`,
the Engine adapter for requests that each carry a `RolloutKey`, and `RolloutDriver`, the
driver that hands that key to the engine.

A rollout request is sampled with its own (seed, prompt index, sample index) key and max
tokens, as `SamplingEngine.generate` samples it, and is cheaper than JetStream's one prefill
and one insert per request: the consecutive requests of one prompt share its prefill
(`SharedPrefix`, remembered for the last prompt under the current weights), and their inserts
wait for the next `generate`, which starts the pending samples of each prefix in one batched
insert. `start_trace`/`stop_trace` record each generate step (tokens with log-probs and finish
flags, and which request each slot held) for the rollout to read back; `release` frees the
decode state the driver's generate thread holds once a rollout is complete.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

import jax
import numpy as np

from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.jetstream import JETSTREAM_LENGTHS, FlowRLDriver, FlowRLEngine
from flowrl_jax.sampling.kernels import DecodeState, bucket
from flowrl_jax.sampling.params import SamplingParams


@dataclass(frozen=True)
class RolloutKey:
    """What a rollout request tells the engine: its output row and its sample key."""

    row: int
    seed: int
    prompt_index: int
    sample_index: int
    max_tokens: int


# A pytree without leaves: it rides in the prefill result through the driver's transfers.
jax.tree_util.register_pytree_node(RolloutKey, lambda k: ((), k), lambda k, _: k)


@dataclass(frozen=True, eq=False)
class SharedPrefix:
    """The prefill of one rollout prompt under one version of the weights, shared by the G
    requests of that prompt (the per-sample key is applied at insert, so the prefix does not
    depend on the sample). A pytree without leaves: JetStream deletes a request's prefill
    arrays after its insert, and these must live on for the next sample of the prompt."""

    cache: Any
    length: int  # positions in the cache: the prompt without its last token
    last_token: int  # fed by the first generate


jax.tree_util.register_pytree_node(SharedPrefix, lambda p: ((), p), lambda p, _: p)


class RolloutEngine(FlowRLEngine):
    """`FlowRLEngine` for rollout requests: shared prefixes per weights version, batched
    pending inserts, a trace of the generate steps, `release` after a rollout. A request
    without a key is served as `FlowRLEngine` serves it."""

    def __init__(self, core: SamplingEngine, params: Any, sampling: SamplingParams, *,
                 max_prefill_length: int, slots: int, cache_len: int,
                 prefill_buckets: tuple[int, ...], tokens_per_generate: int):
        super().__init__(core, params, None, "", sampling, max_prefill_length=max_prefill_length,
                         slots=slots, cache_len=cache_len, prefill_buckets=prefill_buckets,
                         tokens_per_generate=tokens_per_generate)
        # the key of the request the next prefill serves (set on the prefill thread by
        # `RolloutDriver`), which request each slot holds, a trace of every generate's outputs
        self.pending = threading.local()
        self._owner: list[int] = [-1] * self._slots
        self._trace: Optional[list] = None
        # prefix sharing: (weights version, prompt tokens) → prefix, for the last prompt seen
        self._version = 0
        self._last_prefix: Optional[tuple[tuple, SharedPrefix]] = None
        # rollout inserts not yet applied: (slot, prefix, key), started by the next generate
        self._pending: list[tuple[int, SharedPrefix, RolloutKey]] = []
        # `release`: the decode state JetStream's generate thread holds between calls is freed
        # after a rollout (the train step needs the memory) and made afresh on the next call
        self._state_lock = threading.Lock()
        self._held: Any = None  # the decode state last handed back to the generate thread
        self._released = False

    def prefill(self, *, params: Any, existing_prefix: Optional[Any] = None,
                padded_tokens: Any, true_length: int) -> dict:
        """A rollout request's prompt prefix, shared with the prompt's other samples."""
        rollout = getattr(self.pending, "rollout", None)
        self.pending.rollout = None
        if rollout is None:
            return super().prefill(params=params, existing_prefix=existing_prefix,
                                   padded_tokens=padded_tokens, true_length=true_length)
        tokens, n = self._prompt(padded_tokens, true_length)
        key = (self._version, tokens[:n].tobytes())
        last = self._last_prefix
        if last is None or last[0] != key:
            last = (key, SharedPrefix(self._prefill_cache(params, tokens, n), n - 1,
                                      int(tokens[n - 1])))
            self._last_prefix = last
        return {"rollout": rollout, "shared": last[1]}

    def insert(self, prefix: dict, decode_state: DecodeState, slot: int) -> DecodeState:
        """A rollout request waits for the next generate, which starts it with the prompt's
        other samples; any other request is inserted now."""
        with self._state_lock:
            ro = prefix.get("rollout")
            if ro is not None:
                self._pending.append((int(slot), prefix["shared"], ro))
                self._owner[slot] = ro.row
                return decode_state
            st = super().insert(prefix, self._start_pending(self._live(decode_state)), slot)
            self._held = st
            return st

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, Any]:
        k = self._steps
        with self._state_lock:
            if not self._pending and (self._released or self._all_idle(decode_state)):
                # Nothing to decode: JetStream frees a finished slot only once its detokenize
                # thread has read the result, and calls generate until then (a rollout's
                # every sample can be complete). No token is emitted; the cache stays freed.
                return decode_state, self._result_tokens(
                    np.zeros((self._slots, 2 * k + 1), np.int32))
            decode_state = self._start_pending(self._live(decode_state))
            st, data, logp, finish = self._generate(self._params_for(params), decode_state)
            self._held = st
        trace = self._trace  # read once: stop_trace() may clear it from another thread
        if trace is not None:
            trace.append((list(self._owner), (data, logp, finish)))
        return st, self._result_tokens(data)

    def set_params(self, params: Any) -> None:
        """Serve the next requests with `params`; no prefix of the old weights is reused."""
        super().set_params(params)
        self._version += 1
        self._last_prefix = None

    def start_trace(self) -> None:
        """Record every generate step's tokens, log-probs and finish flags from now on."""
        self._trace = []

    def stop_trace(self) -> list[tuple[list[int], Any]]:
        """The recorded calls: (the row each slot held, (data, logprobs, finish)); data is
        [slots, 2·steps + 1] (tokens, emitted, generated), logprobs/finish [steps, slots]."""
        trace, self._trace = self._trace or [], None
        self._last_prefix = None  # the rollout is over: its prefix cache is freed
        return trace

    def release(self) -> None:
        """Free the decode state the generate thread holds (every request is complete); the
        thread's next insert or generate starts from a fresh one."""
        with self._state_lock:
            if self._held is not None:
                for leaf in jax.tree.leaves(self._held):
                    leaf.delete()
            self._held, self._released = None, True

    def _all_idle(self, st: DecodeState) -> bool:
        """During a rollout: whether no slot of `st` is decoding (one read of its [slots]
        flags, as the engine reads each chunk's tokens back); outside one it never skips."""
        return self._trace is not None and not bool(np.any(jax.device_get(st.active)))

    def _live(self, st: DecodeState) -> DecodeState:
        """`st`, or a fresh (idle) decode state where `release` freed it."""
        if self._released:
            self._released = False
            return self.init_decode_state()
        return st

    def _start_pending(self, st: DecodeState) -> DecodeState:
        """Apply the pending rollout inserts: one batched insert per shared prefix, with the
        per-sample key (seed, prompt, sample) as SamplingEngine.generate uses it."""
        pending, self._pending = self._pending, []
        groups: dict[tuple, list] = {}
        for item in pending:  # one insert per (prefix, seed): the seed is one scalar per insert
            groups.setdefault((id(item[1]), item[2].seed), []).append(item)
        for rows in groups.values():
            prefix = rows[0][1]
            m = 1 << (len(rows) - 1).bit_length()  # padded to a power of two: few compiles
            pad = m - len(rows)
            col = lambda f, fill, dtype: np.asarray([f(r) for r in rows] + [fill] * pad,  # noqa: E731
                                                    dtype)
            st = self._insert_rows(
                prefix.cache, st, col(lambda r: r[0], self._slots, np.int32),
                np.full((m,), prefix.last_token, np.int32), np.full((m,), prefix.length, np.int32),
                col(lambda r: r[2].max_tokens, 0, np.int32),
                np.uint32(rows[0][2].seed % 2**32),
                col(lambda r: r[2].prompt_index, 0, np.int32),
                col(lambda r: r[2].sample_index, 0, np.int32))
        return st


class RolloutDriver(FlowRLDriver):
    """`FlowRLDriver` that passes a rollout request's token ids as given (no BOS) and hands
    its key to the engine's next prefill, on the prefill thread."""

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        rollout = getattr(request, "rollout", None)
        if rollout is None:
            return super()._process_prefill_content(request, tokenizer, is_bos,
                                                     max_prefill_length)
        self._prefill_engines[0].pending.rollout = rollout
        ids = np.asarray(request.prefill_content, np.int32)
        padded = np.zeros((bucket(len(ids), JETSTREAM_LENGTHS),), np.int32)
        padded[:len(ids)] = ids
        return padded, len(ids)
