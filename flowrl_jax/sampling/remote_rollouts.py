"""Rollouts from remote `flowrl-jax serve` processes (`rollout.servers: [host:port, …]`):
`RemoteRollouts.generate` has the signature and result of `SamplingEngine.generate`.

The prompts of a call are split over the live servers by prompt index (prompt p goes to live
server p mod k); each request carries its prompts' global indices, the sampling settings,
the seed and the explicit stop ids, so a server's samples are those the in-process engine
gives for the same params (per-sample keys: seed, prompt index, sample index; random.py).
The servers serve the weights last given to `load_weights` (written by the trainer to shared
storage, rl/server_weights.py); `generate` ignores its `params` argument and every request
names the policy it expects, which a server that lost it (a restart) refuses.

Failures: every call has a deadline of `timeout_s` (rollout.timeout_s). A server that is
unreachable, dies, hangs past the deadline or lost its weights is named in a warning, dropped
for the rest of the run, and its prompts are retried once on the remaining servers; a second
failure, or no server left, is a SamplingError naming the servers. A request a server refuses
as invalid is a SamplingError at once (another server would refuse it too).
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import grpc
import numpy as np

from flowrl_jax.config import ConfigError, ModelArch
from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.params import SamplingError, SamplingParams
from flowrl_jax.sampling.results import Rollout
from flowrl_jax.sampling.rollout_server import arch_differences
from flowrl_jax.sampling.rollout_wire import (GENERATE, INFO, LOAD_WEIGHTS, MAX_MESSAGE_BYTES,
                                              method, pack, settings_fields, unpack)

log = logging.getLogger(__name__)

# gRPC codes that mean "this server cannot serve now" (drop it, retry elsewhere); any other
# code (INVALID_ARGUMENT: a request no server would serve) stops the rollout at once
_SERVER_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                    grpc.StatusCode.UNIMPLEMENTED}


class ServerFailure(SamplingError):
    """One server could not answer (its address and the gRPC status in the message)."""

    def __init__(self, address: str, message: str, retryable: bool = True):
        super().__init__(f"rollout server {address}: {message}")
        self.address, self.retryable = address, retryable


class RemoteRollouts:
    """`generate(params, prompts, sampling) -> Rollout` over remote rollout servers."""

    def __init__(self, core: SamplingEngine, servers: Sequence[str], *, timeout_s: float = 600.0):
        self.core = core  # for the stop ids and prompt checks (it never samples here)
        self.servers = list(servers)
        self.live = list(servers)
        self.timeout_s = float(timeout_s)
        self.run = uuid.uuid4().hex[:12]  # names this trainer's pushes (a restart re-pushes)
        self.expect: Optional[dict] = None  # the policy every live server holds
        self.loaded: dict[str, Any] = {}  # address → {"run", "version"} it reported
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self._channels = {a: grpc.insecure_channel(a, options=opts) for a in self.servers}
        self._pool = ThreadPoolExecutor(max(1, 2 * len(self.servers)),
                                        thread_name_prefix="rollout-server")

    # ----------------------------------------------------------------- calls

    def _call(self, address: str, name: str, fields: dict,
              arrays: Optional[dict] = None) -> tuple[dict, dict]:
        """One method call with the deadline; a ServerFailure naming the server otherwise."""
        stub = self._channels[address].unary_unary(method(name))
        try:
            reply = stub(pack(fields, arrays), timeout=self.timeout_s)
        except grpc.RpcError as e:
            code = e.code()
            why = ("no answer within rollout.timeout_s = "
                   f"{self.timeout_s:g} s (hung?)" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                   else e.details() or str(code))
            raise ServerFailure(address, f"{name} failed: {code.name}: {why}",
                                retryable=code in _SERVER_FAILURES) from None
        return unpack(reply)

    def _each(self, addresses: Sequence[str], fn: Any) -> dict[str, Any]:
        """fn(address) on every address at once: {address: result or the exception}."""
        futures = {a: self._pool.submit(fn, a) for a in addresses}
        out: dict[str, Any] = {}
        for a, f in futures.items():
            try:
                out[a] = f.result()
            except Exception as e:  # noqa: BLE001 - collected, the caller decides
                out[a] = e
        return out

    def _drop(self, failures: dict[str, Exception]) -> None:
        """Drop failed servers for the rest of the run; SamplingError when none is left."""
        for a, e in failures.items():
            log.warning("%s; dropped for the rest of the run", e)
            if a in self.live:
                self.live.remove(a)
        if not self.live:
            raise SamplingError("no rollout server left: " + "; ".join(map(str, failures.values())))

    # ----------------------------------------------------------------- set-up, weights

    def check(self, arch: ModelArch, max_new_tokens: int) -> None:
        """Every server answers, serves `arch` and allows `max_new_tokens` (before training);
        errors name the server."""
        got = self._each(self.servers, lambda a: self._call(a, INFO, {})[0])
        for a, info in got.items():
            if isinstance(info, Exception):
                raise SamplingError(f"rollout.servers: {info}")
            diff = arch_differences(arch, ModelArch.from_hf_dict(info["arch"], source=a))
            if diff:
                raise ConfigError(f"rollout.servers: server {a} serves another model "
                                  f"architecture (trainer vs server: {'; '.join(diff)})")
            if int(info["max_new_tokens"]) < max_new_tokens:
                raise ConfigError(f"rollout.servers: server {a} allows at most "
                                  f"{info['max_new_tokens']} new tokens per request, "
                                  f"rollout.max_new_tokens is {max_new_tokens} (serve "
                                  "--max-new-tokens)")
            self.loaded[a] = {"run": info["run"], "version": info["version"]}

    def has(self, version: int) -> bool:
        """Whether every live server holds this trainer's policy `version`."""
        want = {"run": self.run, "version": int(version)}
        return all(self.loaded.get(a) == want for a in self.live)

    def load_weights(self, path: str, version: int) -> None:
        """Every live server loads the policy at `path` (shared storage) as `version`;
        servers that already hold it are skipped. A refusal (another architecture) is an
        error naming the server; an unreachable or hung server is dropped."""
        want = {"run": self.run, "version": int(version)}
        todo = [a for a in self.live if self.loaded.get(a) != want]
        fields = {"path": str(path), **want}
        got = self._each(todo, lambda a: self._call(a, LOAD_WEIGHTS, fields)[0])
        failures = {}
        for a, r in got.items():
            if isinstance(r, ServerFailure) and not r.retryable:
                raise r
            if isinstance(r, Exception):
                failures[a] = r
            else:
                self.loaded[a] = {"run": r["run"], "version": r["version"]}
        if failures:
            self._drop(failures)
        self.expect = want

    # ----------------------------------------------------------------- sampling

    def generate(self, params: Any, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> Rollout:
        """Sample `sampling.n` responses per prompt on the servers (with the weights of the
        last `load_weights`; `params` is not read)."""
        del params  # the servers hold the pushed weights; `expect` guards against others
        if self.expect is None:
            raise SamplingError("rollout servers: no weights pushed yet (load_weights first)")
        sampling.validate()
        prompts = self.core.checked_prompts(prompts)
        settings = settings_fields(sampling, [t for t in self.core.stop_ids_for(sampling)
                                              if t >= 0])
        n, rows = sampling.n, len(prompts) * sampling.n
        out = Rollout(np.repeat(np.arange(len(prompts), dtype=np.int32), n),
                      np.tile(np.arange(n, dtype=np.int32), len(prompts)),
                      np.zeros((rows, sampling.max_new_tokens), np.int32),
                      np.zeros((rows, sampling.max_new_tokens), np.float32),
                      np.zeros((rows,), np.int32), [""] * rows)

        def request(address: str, share: list[int]) -> None:
            ids = [prompts[p] for p in share]
            fields, arrays = self._call(address, GENERATE, {"settings": settings,
                                                            "expect": self.expect}, {
                "prompt_tokens": np.asarray([t for p in ids for t in p], np.int32),
                "prompt_lengths": np.asarray([len(p) for p in ids], np.int32),
                "prompt_index": np.asarray(share, np.int32)})
            rows_of = np.asarray([p * n + s for p in share for s in range(n)])
            out.tokens[rows_of] = arrays["tokens"]
            out.logprobs[rows_of] = arrays["logprobs"]
            out.lengths[rows_of] = arrays["lengths"]
            for r, reason in zip(rows_of.tolist(), fields["finish_reasons"]):
                out.finish_reasons[r] = reason

        todo = list(range(len(prompts)))
        for attempt in range(2):  # the first try, then one retry on the remaining servers
            live = list(self.live)
            shares = {a: todo[i::len(live)] for i, a in enumerate(live)}
            got = self._each([a for a in live if shares[a]],
                             lambda a: request(a, shares[a]))
            failures = {a: e for a, e in got.items() if e is not None}
            for e in failures.values():
                if not isinstance(e, ServerFailure) or not e.retryable:
                    raise e
            if not failures:
                return out
            todo = sorted(p for a in failures for p in shares[a])
            if attempt == 1:
                raise SamplingError("rollout failed on retry: "
                                    + "; ".join(map(str, failures.values())))
            self._drop(failures)  # raises when no server is left
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the channels (calls in flight end by their deadlines)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels.values():
            ch.close()
