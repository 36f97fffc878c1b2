"""The rollout methods of `serve` (disaggregated rollouts, `rollout.servers`): a trainer's
remote sampler (sampling/remote_rollouts.py) asks for samples and pushes its weights here.

Three gRPC methods on the server's port beside JetStream's (message format: rollout_wire.py):
- `Info` → the served architecture (a HF config dict), the loaded policy version and run,
  the per-request max-tokens limit;
- `LoadWeights {path, version, run}` → load the policy the trainer wrote to `path` (shared
  storage; a HF directory) onto this server's engine: every later request — rollouts, the
  OpenAI endpoint, JetStream's — is served with it. A directory whose architecture differs
  from the served model is refused, naming both.
- `Generate {prompts, prompt_index, settings, seed, expect}` → `SamplingEngine.generate` of
  those prompts with their global prompt indices in the sample keys, so the samples equal the
  trainer's in-process engine's for the same params and seed; the response carries the raw
  tokens (a final stop token included), the sampler's log-probs, the lengths and finish
  reasons. A request that expects another policy version than the loaded one is refused
  (FAILED_PRECONDITION): a server that restarted never returns samples of stale weights.

Loading weights needs checkpoint code, which sampling/ does not import: `serve` passes the
readers in (`read_arch`, `read_state`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from flowrl_jax.config import ModelArch
from flowrl_jax.errors import FlowRLError
from flowrl_jax.sampling.completions import CompletionService
from flowrl_jax.sampling.params import SamplingError
from flowrl_jax.sampling.rollout_wire import (GENERATE, INFO, LOAD_WEIGHTS, SERVICE, pack,
                                              sampling_of, unpack)


class StaleWeights(SamplingError):
    """A rollout request expected another policy version than the one loaded."""


def arch_differences(ours: ModelArch, theirs: ModelArch) -> list[str]:
    """`field ours vs theirs` for every architecture field that differs (HF-normalised)."""
    a = ModelArch.from_hf_dict(ours.to_hf_dict())
    b = ModelArch.from_hf_dict(theirs.to_hf_dict())
    return [f"{k} {getattr(a, k)!r} vs {getattr(b, k)!r}"
            for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k)]


class RolloutService:
    """Rollout requests and weight loads on a served model (thread-safe)."""

    def __init__(self, service: CompletionService, read_arch: Callable[[str], ModelArch],
                 read_state: Callable[[str], Any],
                 set_engine_params: Optional[Callable[[Any], None]] = None):
        self.service = service
        self.core = service.core
        self.read_arch, self.read_state = read_arch, read_state  # path → arch / params
        self.set_engine_params = set_engine_params  # JetStream's engine (plain requests)
        self.version: Optional[int] = None  # None: the weights `serve` started with
        self.run: Optional[str] = None
        self.path: Optional[str] = None
        self._load_lock = threading.Lock()

    def info(self) -> dict:
        """What this server serves."""
        return {"arch": self.core.arch.to_hf_dict(), "version": self.version, "run": self.run,
                "path": self.path, "max_new_tokens": self.service.max_new_tokens_limit}

    def load_weights(self, path: str, version: int, run: str) -> dict:
        """Serve the policy at `path` from now on as (`run`, `version`)."""
        t0 = time.perf_counter()
        with self._load_lock:
            diff = arch_differences(self.core.arch, self.read_arch(path))
            if diff:
                raise SamplingError(f"{path}: its architecture differs from this server's model "
                                    f"(server vs pushed: {'; '.join(diff)})")
            params = self.core.params_of(self.read_state(path))
            with self.service._lock:  # not while a request samples
                self.service.params = params
                if self.set_engine_params is not None:
                    self.set_engine_params(params)
                self.version, self.run, self.path = int(version), str(run), str(path)
        return {"version": self.version, "run": self.run, "seconds": time.perf_counter() - t0}

    def generate(self, fields: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Sample a rollout request's prompts (see the module docstring)."""
        try:
            flat, lengths = arrays["prompt_tokens"], arrays["prompt_lengths"]
            index = arrays["prompt_index"]
            sp = sampling_of(fields["settings"])
            expect = fields.get("expect")
        except (KeyError, TypeError, ValueError) as e:
            raise SamplingError(f"malformed rollout request ({type(e).__name__}: {e})") from e
        if int(lengths.sum()) != flat.size or index.shape != lengths.shape:
            raise SamplingError("malformed rollout request (prompt arrays disagree)")
        sp.validate()
        if sp.max_new_tokens > self.service.max_new_tokens_limit:
            raise SamplingError(f"max_new_tokens {sp.max_new_tokens} exceeds this server's limit "
                                f"{self.service.max_new_tokens_limit} (serve --max-new-tokens)")
        prompts = np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1])
        with self.service._lock:
            here = {"version": self.version, "run": self.run}
            if expect is not None and expect != here:
                raise StaleWeights(f"the request expects policy {expect} but this server has "
                                   f"{here} loaded")
            out = self.core.generate(self.service.params, [p.tolist() for p in prompts], sp,
                                     prompt_indices=index.tolist())
        return ({"finish_reasons": list(out.finish_reasons), **here},
                {"tokens": out.tokens, "logprobs": out.logprobs, "lengths": out.lengths})


def add_rollout_methods(server: Any, rollouts: RolloutService) -> None:
    """Register `Info`, `Generate`, `LoadWeights` on a `grpc.aio` server (before it starts)."""
    import grpc  # the serve extra, as jetstream_server.py

    def info(fields: dict, arrays: dict) -> bytes:
        return pack(rollouts.info())

    def load(fields: dict, arrays: dict) -> bytes:
        try:
            path, version, run = str(fields["path"]), int(fields["version"]), str(fields["run"])
        except (KeyError, TypeError, ValueError) as e:
            raise SamplingError(f"malformed LoadWeights request ({type(e).__name__}: {e})") from e
        return pack(rollouts.load_weights(path, version, run))

    def generate(fields: dict, arrays: dict) -> bytes:
        return pack(*rollouts.generate(fields, arrays))

    async def handle(fn: Callable[[dict, dict], bytes], request: bytes, context: Any) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            fields, arrays = unpack(request)
            return await loop.run_in_executor(None, fn, fields, arrays)
        except StaleWeights as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (FlowRLError, ValueError, OSError) as e:  # e.g. a CheckpointError naming a file
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - report, keep serving
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    handlers = {name: grpc.unary_unary_rpc_method_handler(functools.partial(handle, fn))
                for name, fn in ((INFO, info), (GENERATE, generate), (LOAD_WEIGHTS, load))}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
