"""Rollouts through an in-process JetStream driver: `JetStreamRollouts.generate` has the
signature and result of `SamplingEngine.generate`, but every sample is one request to
JetStream's driver (`jetstream.core.orchestrator`) over our Engine adapter (`RolloutEngine`,
jetstream_rollout_engine.py).

Each request carries its own settings: the prompt's token ids, max new tokens and the
per-sample key (seed, prompt index, sample index) that `SamplingEngine.generate` uses, so
both return the same samples for the same seed. The compiled part of the sampling settings
(temperature, top-p/k, min-p, stop ids) selects a driver; one driver per distinct setting is
built on first use and kept (training and evaluation settings each get theirs). The params
are pushed to the driver's engine before each call (`set_params`), so the driver always
serves the trainer's current weights.

The requests of a prompt are placed one after the other, so its G samples share one prefill
and are started by one batched insert (RolloutEngine), and no decode runs while every slot is
idle. Each `generate` call of the driver runs `decode_chunk` decode steps (as the engine does),
returned to JetStream as that many speculative tokens per slot. After a rollout the decode
state (the KV cache of every slot) that the driver's generate thread holds is freed
(`RolloutEngine.release`), so the train step has the memory, as after `SamplingEngine.generate`.
JetStream's detokenizer returns token ids without the stop token and without log-probs, so
the samples are read from the adapter's trace of its generate steps (which slot held which
sample at each step); the driver's return channel only says when a sample is complete. A
sample not complete within `timeout_s`, or a driver thread that fails, is a SamplingError
(never a hang, never the SIGKILL JetStream itself would send).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.jetstream import JETSTREAM_LENGTHS, js
from flowrl_jax.sampling.jetstream_compat import driver_failure
from flowrl_jax.sampling.jetstream_rollout_engine import RolloutDriver, RolloutEngine, RolloutKey
from flowrl_jax.sampling.kernels import bucket
from flowrl_jax.sampling.params import SamplingError, SamplingParams
from flowrl_jax.sampling.results import FINISH_NAMES, FINISH_NONE, Rollout


_POLL_S = 0.2  # how often a waiting rollout checks its driver's threads


class _Done:
    """The request's return channel: JetStream adds token lists and closes it when complete."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def add_result(self, samples: Any) -> None:
        del samples  # the tokens come from the engine's trace (stop token and log-probs kept)

    def close(self) -> None:
        self.event.set()

    def cancel(self) -> None:
        self.event.set()


class RolloutRequest(js.orchestrator.ActiveRequest):
    """A JetStream request of one sample, carrying its `RolloutKey`."""

    def __init__(self, prompt: list[int], key: RolloutKey):
        super().__init__(max_tokens=key.max_tokens, return_channel=_Done(),
                         prefill_content=list(prompt), is_client_side_tokenization=True)
        self.rollout = key


class JetStreamRollouts:
    """`generate(params, prompts, sampling) -> Rollout` over in-process JetStream drivers."""

    def __init__(self, core: SamplingEngine, *, timeout_s: float = 600.0):
        self.core = core
        self.timeout_s = float(timeout_s)
        self._drivers: dict[tuple, tuple[RolloutEngine, Any]] = {}
        self._lock = threading.Lock()  # one rollout at a time per driver set

    def _driver(self, params: Any, sampling: SamplingParams, slots: int, length: int,
                longest: int) -> tuple[RolloutEngine, Any]:
        """The driver for these settings and shapes (built once: it compiles its kernels)."""
        max_prefill = bucket(longest, JETSTREAM_LENGTHS)
        key = (self.core.spec_for(sampling), tuple(self.core.stop_ids_for(sampling).tolist()),
               sampling.max_new_tokens, slots, length, max_prefill)
        if key not in self._drivers:
            engine = RolloutEngine(self.core, params, sampling, max_prefill_length=max_prefill,
                                   slots=slots, cache_len=length,
                                   prefill_buckets=tuple(self.core.prefill_buckets),
                                   tokens_per_generate=self.core.decode_chunk)
            p = engine.load_params()
            driver = RolloutDriver(prefill_engines=[engine], generate_engines=[engine],
                                   prefill_params=[p], generate_params=[p], interleaved_mode=True,
                                   jax_padding=False)
            self._drivers[key] = (engine, driver)
        return self._drivers[key]

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> Rollout:
        """Sample `sampling.n` responses per prompt, one JetStream request per sample."""
        sampling.validate()
        prompts = self.core.checked_prompts(prompts)
        n = sampling.n
        slots = self.core.num_slots(len(prompts) * n)
        longest = max(len(p) for p in prompts)
        length = self.core.cache_length(longest, sampling.max_new_tokens)
        self.core.check_fits([len(p) for p in prompts], sampling.max_new_tokens, slots, length)
        with self._lock:
            engine, driver = self._driver(params, sampling, slots, length, longest)
            engine.set_params(params)
            engine.start_trace()
            requests = [RolloutRequest(prompts[p], RolloutKey(p * n + s, sampling.seed, p, s,
                                                              sampling.max_new_tokens))
                        for p in range(len(prompts)) for s in range(n)]
            try:
                for r in requests:
                    driver.place_request_on_prefill_queue(r)
                left = self._wait(requests, driver)
                failure = driver_failure(driver)  # before the trace stops under a live driver
            finally:
                trace = engine.stop_trace()
            if not (left or failure):  # every sample complete: the driver's cache is not needed
                engine.release()
            if left or failure:
                # Its requests may still land in slots later: this driver is not reused.
                self._drivers.pop(next(k for k, v in self._drivers.items() if v[1] is driver))
                driver.stop()
                why = (f"the driver failed ({failure})" if failure else
                       f"not complete after {self.timeout_s:g} s (rollout.timeout_s)")
                raise SamplingError(f"JetStream rollout: {left} of {len(requests)} samples {why}; "
                                    "the driver was stopped")
        return _assemble(trace, len(prompts), n, sampling.max_new_tokens)

    def _wait(self, requests: list[RolloutRequest], driver: Any) -> int:
        """Wait for every request until the deadline or a driver failure; the number still not
        complete."""
        deadline = time.monotonic() + self.timeout_s
        for r in requests:
            while not r.return_channel.event.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or driver_failure(driver):
                    return sum(not q.return_channel.event.is_set() for q in requests)
        return 0

    def close(self) -> None:
        """Stop every driver's threads."""
        for _, driver in self._drivers.values():
            driver.stop()
        self._drivers.clear()


def _assemble(trace: list, prompts: int, n: int, max_new: int) -> Rollout:
    """The Rollout (prompt-major rows) from the engine's generate-step trace."""
    rows = prompts * n
    tokens = np.zeros((rows, max_new), np.int32)
    logprobs = np.zeros((rows, max_new), np.float32)
    lengths = np.zeros((rows,), np.int32)
    reasons = ["length"] * rows
    calls = jax.device_get([outs for _, outs in trace])
    for (owner, _), (data, logp, finish) in zip(trace, calls):
        steps = logp.shape[0]
        for t in range(steps):  # the decode steps of one generate call, in order
            for slot in np.flatnonzero(data[:, steps + t]).tolist():
                row = owner[slot]
                if row < 0 or lengths[row] >= max_new:
                    continue  # a slot of an earlier request decoding on until it is reused
                k = lengths[row]
                tokens[row, k], logprobs[row, k] = data[slot, t], logp[t, slot]
                lengths[row] = k + 1
                if int(finish[t, slot]) != FINISH_NONE:
                    reasons[row] = FINISH_NAMES[int(finish[t, slot])]
    return Rollout(np.repeat(np.arange(prompts, dtype=np.int32), n),
                   np.tile(np.arange(n, dtype=np.int32), prompts), tokens, logprobs, lengths,
                   reasons)
