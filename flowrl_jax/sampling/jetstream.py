"""Our sampling engine behind JetStream's Engine API, plus a validating gRPC server.

JetStream's orchestrator drives `prefill` → `insert(slot)` → one `generate` step per call and
detokenises on its own threads. Prefill computes the cache of `prompt[:-1]`; the first
`generate` after `insert` feeds the last prompt token and samples the first new token (the
same decode kernel as `SamplingEngine.generate`). A slot stops by itself on EOS/stop ids or a
full cache and then reports `valid = False`, which completes the request.

JetStream's driver threads would SIGKILL the process on any exception (jetstream_compat makes
that a failure the server's `wait` raises), so requests are validated in
the gRPC handler (`ValidatingOrchestrator`) and answered with INVALID_ARGUMENT before they
reach the driver (a prompt longer than the model's context included); prefill/insert
additionally clamp their inputs instead of raising.

The JetStream DecodeRequest carries only `max_tokens`. A request with per-request sampling
settings sends them as gRPC metadata `x-flowrl-sampling` (a JSON object with OpenAI field
names: temperature, top_p, top_k, min_p, n, seed, stop, ignore_eos; and `chat: true` to render
a text prompt with the chat template); such a request is served
by `CompletionService` (sampling/completions.py, as the HTTP endpoint's are) and answered
with one DecodeResponse holding its n samples. Requests without it go through JetStream's
continuous batching with the server's settings.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from flowrl_jax.sampling.completions import (SAMPLING_METADATA_KEY, CompletionService,
                                             sampling_from_metadata)
from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.kernels import DecodeState, bucket
from flowrl_jax.sampling.params import SamplingError, SamplingParams
from flowrl_jax.sampling.random import sample_keys
from flowrl_jax.sampling.rollout_server import RolloutService, add_rollout_methods
from flowrl_jax.sampling.rollout_wire import MAX_MESSAGE_BYTES
from flowrl_jax.sampling.jetstream_compat import driver_failure, import_jetstream

js = import_jetstream()
engine_api = js.engine_api
Array = jax.Array

# pad_tokens() only accepts a max_prefill_length from this list when it pads token requests.
JETSTREAM_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class HFTokenizer(js.tokenizer_api.Tokenizer):
    """JetStream tokenizer over a Hugging Face tokenizer (no SentencePiece/seqio needed)."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], buckets: tuple[int, ...]):
        self.tokenizer = tokenizer
        self._stop = set(int(t) for t in stop_ids)
        self._buckets = list(buckets)

    def encode(self, s: str, **kwargs: Any) -> tuple[Union[jax.Array, np.ndarray], int]:
        ids = np.asarray(self.tokenizer.encode(s, add_special_tokens=False), np.int32)
        is_bos = bool(kwargs.get("is_bos", True)) and self.tokenizer.bos_token_id is not None
        return js.token_utils.pad_tokens(ids, self.bos_id, self.pad_id, is_bos=is_bos,
                                         prefill_lengths=self._buckets,
                                         max_prefill_length=kwargs.get("max_prefill_length"),
                                         jax_padding=kwargs.get("jax_padding", False))

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @property
    def stop_tokens(self) -> set[int]:
        return set(self._stop)

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else 0)

    @property
    def eos_id(self) -> int:
        eid = self.tokenizer.eos_token_id
        return int(eid if eid is not None else -1)

    @property
    def bos_id(self) -> int:
        bid = self.tokenizer.bos_token_id
        return int(bid if bid is not None else self.pad_id)


@functools.lru_cache(maxsize=None)
def _insert_rows_fn(kernels: Any) -> Any:
    """Jitted: start M requests of one prefix in slots `dst` (out of range = padding), each
    with the key (seed, prompt index, sample index); `seed` one scalar for all M."""
    def insert_rows(cache: Any, st: DecodeState, dst: Array, last_token: Array, pos: Array,
                    budget: Array, seed: Array, prompt_index: Array,
                    sample_index: Array) -> DecodeState:
        keys = sample_keys(seed, prompt_index, sample_index)  # as SamplingEngine.generate
        return kernels.insert(st, cache, jnp.zeros_like(dst), dst, last_token, pos, budget, keys)
    return jax.jit(insert_rows, donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _decode_fn(kernels: Any, stop_ids: tuple, spec: Any, steps: int) -> Any:
    """Jitted: `steps` decode steps → (state, [slots, 2·steps + 1] tokens/emitted/generated,
    [steps, slots] log-probs, [steps, slots] finish reasons)."""
    def decode(params: Any, st: DecodeState) -> tuple:
        st, outs = kernels.decode_chunk(params, st, jnp.asarray(stop_ids, jnp.int32), spec, steps)
        data = jnp.concatenate([outs.tokens.T, outs.emitted.T.astype(jnp.int32),
                                st.generated[:, None]], axis=1)
        return st, data, outs.logprobs, outs.finish
    return jax.jit(decode, donate_argnums=(1,))


class FlowRLEngine(engine_api.Engine):
    """JetStream Engine over `SamplingEngine`: fixed sampling params, one prefill and one
    insert per request, `tokens_per_generate` decode steps per generate; `set_params` swaps
    the weights served. Rollouts use its subclass `RolloutEngine`
    (sampling/jetstream_rollout_engine.py)."""

    def __init__(self, core: SamplingEngine, params: Any, tokenizer: Any, tokenizer_path: str,
                 sampling: SamplingParams, *, max_prefill_length: int = 1024, slots: int = 8,
                 cache_len: Optional[int] = None,
                 prefill_buckets: Optional[tuple[int, ...]] = None, tokens_per_generate: int = 1):
        sampling.validate()
        self.core = core
        self._params = core.params_of(params)
        self.tokenizer = tokenizer
        self.tokenizer_path = str(tokenizer_path)
        self.sampling = sampling
        self.spec = core.spec_for(sampling)
        self.stop_ids = core.stop_ids_for(sampling)
        self._max_prefill = bucket(max_prefill_length, JETSTREAM_LENGTHS)
        self._buckets = tuple(b for b in JETSTREAM_LENGTHS if b <= self._max_prefill)
        self._slots = int(slots)
        # decode steps per `generate` call: JetStream reads them as speculations of one step
        self._steps = int(tokens_per_generate)
        # prompt-body buckets of the prefill: the sampling engine's for rollouts (same shapes)
        self._body_buckets = tuple(prefill_buckets or self._buckets)
        # Cache: the longest prompt + max_new_tokens; a slot stops itself when it is full.
        self.cache_len = int(cache_len or self._max_prefill + sampling.max_new_tokens)
        core.check_fits([1], sampling.max_new_tokens, self._slots, self.cache_len)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._prefill = core.kernels.prefill_jit
        # compiled once per kernels and settings, not per adapter (each trainer makes its own)
        self._generate = _decode_fn(core.kernels, tuple(int(t) for t in self.stop_ids), self.spec,
                                    self._steps)
        self._insert_rows = _insert_rows_fn(core.kernels)  # served and rollout requests
        self._live_params: Any = None  # the weights `set_params` pushed, served from then on

    # ----------------------------------------------------------------- Engine API

    def prefill(self, *, params: Any, existing_prefix: Optional[Any] = None,
                padded_tokens: Any, true_length: int) -> dict:
        """Cache of the prompt without its last token (that one is fed by the first generate)."""
        del existing_prefix  # session caches are not supported; validation rejects them
        tokens, n = self._prompt(padded_tokens, true_length)
        return {"cache": self._prefill_cache(params, tokens, n), "length": jnp.int32(n - 1),
                "last_token": jnp.int32(tokens[n - 1])}

    def _prompt(self, padded_tokens: Any, true_length: int) -> tuple[np.ndarray, int]:
        """The padded prompt with its ids clamped into the vocabulary, and its length n
        clamped to [1, padded length] (prefill clamps instead of raising: see the top)."""
        tokens = np.asarray(padded_tokens, np.int32).reshape(-1)
        n = int(min(max(int(true_length), 1), tokens.shape[0]))
        return np.clip(tokens, 0, self.core.arch.vocab_size - 1), n

    def _prefill_cache(self, params: Any, tokens: np.ndarray, n: int) -> Any:
        """The cache of the first n − 1 of `tokens` (one prompt)."""
        body = np.zeros((1, bucket(max(n - 1, 1), self._body_buckets)), np.int32)
        body[0, :n - 1] = tokens[:n - 1]
        return self._prefill(self._params_for(params), body, np.array([n - 1], np.int32))

    def insert(self, prefix: dict, decode_state: DecodeState, slot: int) -> DecodeState:
        """Start the request of `prefix` in `slot`, keyed (server seed, request number, 0)."""
        with self._lock:
            request = next(self._counter)
        return self._insert_rows(prefix["cache"], decode_state, np.asarray([slot], np.int32),
                                 prefix["last_token"][None], prefix["length"][None],
                                 np.asarray([self.cache_len], np.int32),
                                 np.uint32(self.sampling.seed % 2**32),
                                 np.asarray([request % 2**31], np.int32), np.zeros((1,), np.int32))

    def _params_for(self, params: Any) -> Any:
        return params if self._live_params is None else self._live_params

    def set_params(self, params: Any) -> None:
        """Serve the next requests with `params` (the trainer's weights after an update)."""
        self._live_params = self.core.params_of(params)

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, Any]:
        st, data, _, _ = self._generate(self._params_for(params), decode_state)
        return st, self._result_tokens(data)

    def _result_tokens(self, data: Any) -> Any:
        """JetStream's view of one generate call's [slots, 2·steps + 1] outputs (tokens,
        emitted flags, tokens generated so far)."""
        k = self._steps
        return engine_api.ResultTokens(data=data, tokens_idx=(0, k), valid_idx=(k, 2 * k),
                                       length_idx=(2 * k, 2 * k + 1), samples_per_slot=1)

    def load_params(self, *args: Any, **kwargs: Any) -> Any:
        return self._params

    def init_decode_state(self, *args: Any, **kwargs: Any) -> DecodeState:
        return self.core.init_state(self._slots, self.cache_len)

    def get_prefix_destination_sharding(self) -> Any:
        if self.core.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.sharding.NamedSharding(self.core.mesh, jax.sharding.PartitionSpec())

    def get_tokenizer(self) -> Any:
        return js.tokenizer_pb2.TokenizerParameters(path=self.tokenizer_path)

    def build_tokenizer(self, metadata: Any) -> HFTokenizer:
        return HFTokenizer(self.tokenizer, {int(t) for t in self.stop_ids if t >= 0}, self._buckets)

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def mesh(self) -> jax.sharding.Mesh:
        if self.core.mesh is not None:
            return self.core.mesh
        from flowrl_jax.mesh import single_device_mesh
        return single_device_mesh()

    @property
    def colocated_cpus(self) -> None:
        return None

    # ----------------------------------------------------------------- validation

    def validate_request(self, request: Any) -> Optional[str]:
        """None when the DecodeRequest can be served, else a message naming the problem."""
        which = request.WhichOneof("content")
        if which is None:
            return "request has neither text_content nor token_content"
        if request.session_cache:
            return "session_cache (multi-turn prefix reuse) is not supported by this server"
        if which == "text_content":
            if not request.text_content.text:
                return "text_content.text is empty"
            ids = self.tokenizer.encode(request.text_content.text, add_special_tokens=False)
            n = len(ids) + (1 if self.tokenizer.bos_token_id is not None else 0)
        else:
            ids = list(request.token_content.token_ids)
            if not ids:
                return "token_content.token_ids is empty"
            vocab = self.core.arch.vocab_size
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                return f"token_content.token_ids: id {bad[0]} is outside the vocabulary [0, {vocab})"
            n = len(ids) + (1 if self.tokenizer.bos_token_id is not None else 0)
        if n == 0:
            return "the prompt tokenizes to zero tokens"
        if n > self._max_prefill:
            return f"prompt has {n} tokens; this server accepts at most {self._max_prefill}"
        if request.max_tokens <= 0:
            return f"max_tokens must be > 0, got {request.max_tokens}"
        if request.max_tokens > self.sampling.max_new_tokens:
            return (f"max_tokens {request.max_tokens} exceeds this server's limit "
                    f"{self.sampling.max_new_tokens} (serve --max-new-tokens)")
        context = self.core.arch.max_position_embeddings
        if n + request.max_tokens > context:
            return (f"this model's maximum context length is {context} tokens; the prompt has "
                    f"{n} tokens and max_tokens is {request.max_tokens}")
        return None

    def prompt_ids(self, request: Any) -> list[int]:
        """The token ids of a validated request's prompt (no BOS: the sampler's convention)."""
        if request.WhichOneof("content") == "text_content":
            return self.tokenizer.encode(request.text_content.text, add_special_tokens=False)
        return list(request.token_content.token_ids)


class ValidatingOrchestrator(js.orchestrator.LLMOrchestrator):
    """JetStream's gRPC servicer with request validation (bad requests never reach the driver)."""

    def __init__(self, driver: Any, engine: FlowRLEngine,
                 service: Optional[CompletionService] = None):
        super().__init__(driver=driver)
        self._engine = engine
        self._service = service

    async def Decode(self, request: Any, context: Any = None):  # noqa: N802 - gRPC name
        body = None
        try:
            err = self._engine.validate_request(request)
            if err is None and context is not None:
                body = sampling_from_metadata(context.invocation_metadata())
                if body is not None and self._service is None:
                    err = f"this server does not take per-request settings ({SAMPLING_METADATA_KEY})"
        except SamplingError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - e.g. a tokenizer failure: report, keep serving
            err = f"could not process the request: {type(e).__name__}: {e}"
        if err is None and body is not None:
            try:
                yield await self._decode_with_settings(request, body)
                return
            except SamplingError as e:
                err = str(e)
        if err is not None:
            import grpc

            if context is None:
                raise ValueError(err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
            return
        async for resp in super().Decode(request, context):
            yield resp

    async def _decode_with_settings(self, request: Any, body: dict) -> Any:
        """Serve a request with its own sampling settings: one response with its n samples."""
        body = {**body, "max_tokens": request.max_tokens}
        chat = body.pop("chat", False)
        sp, stop = self._service.params_from(body)
        ids = self._engine.prompt_ids(request)
        if chat:  # the text is one user message, rendered with the chat template
            if request.WhichOneof("content") != "text_content":
                raise SamplingError("chat: true needs text_content")
            ids = self._service.render_chat([{"role": "user",
                                              "content": request.text_content.text}])
        loop = asyncio.get_running_loop()
        c = await loop.run_in_executor(None, self._service.complete, ids, sp, stop)
        pb = js.jetstream_pb2.DecodeResponse
        samples = [pb.StreamContent.Sample(text=ch.text, token_ids=ch.token_ids)
                   for ch in c.choices]
        return pb(stream_content=pb.StreamContent(samples=samples))


class FlowRLDriver(js.orchestrator.Driver):
    """JetStream's driver with token requests fixed: upstream always prepends `bos_id` (for
    Qwen, which has no BOS, a stray pad token) and crashes on a list when it does not."""

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        content = request.prefill_content
        if isinstance(content, str):
            return super()._process_prefill_content(request, tokenizer, is_bos, max_prefill_length)
        has_bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None) is not None
        return js.token_utils.pad_tokens(np.asarray(content, np.int32), tokenizer.bos_id,
                                         tokenizer.pad_id, is_bos=is_bos and has_bos,
                                         max_prefill_length=max_prefill_length,
                                         jax_padding=self._jax_padding)


@dataclass
class Server:
    """A running JetStream gRPC server; `stop()` shuts the driver threads and gRPC down."""

    port: int
    driver: Any
    _grpc_server: Any
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread

    def stop(self, grace: float = 2.0) -> None:
        self.driver.stop()
        asyncio.run_coroutine_threadsafe(self._grpc_server.stop(grace=grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def wait(self) -> None:
        """Block until the server terminates (Ctrl-C stops it); a driver thread that fails
        stops the server with a SamplingError naming it."""
        done = asyncio.run_coroutine_threadsafe(self._grpc_server.wait_for_termination(),
                                                self._loop)
        try:
            while True:
                try:
                    done.result(timeout=1.0)
                    return
                except futures.TimeoutError:
                    failure = driver_failure(self.driver)
                    if failure:
                        raise SamplingError(f"JetStream server: the driver stopped serving: "
                                            f"{failure}")
        finally:
            self.stop()


def start_server(engine: FlowRLEngine, *, host: str = "127.0.0.1", port: int = 9000,
                 threads: int = 64, service: Optional[CompletionService] = None,
                 rollouts: Optional[RolloutService] = None) -> Server:
    """Start JetStream's driver (interleaved mode) and a gRPC server; port 0 picks a free one.
    With `service`, requests carrying `x-flowrl-sampling` metadata get their own settings;
    with `rollouts`, the server also answers the rollout methods (rollout_server.py)."""
    import grpc

    params = engine.load_params()
    driver = FlowRLDriver(prefill_engines=[engine], generate_engines=[engine], prefill_params=[params],
                     generate_params=[params], interleaved_mode=True, jax_padding=False)
    loop = asyncio.new_event_loop()
    executor = futures.ThreadPoolExecutor(max_workers=threads)
    loop.set_default_executor(executor)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make():
        # no SO_REUSEPORT: a second server on a busy port must fail, not share the port
        server = grpc.aio.server(executor, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        js.jetstream_pb2_grpc.add_OrchestratorServicer_to_server(
            ValidatingOrchestrator(driver, engine, service), server)
        if rollouts is not None:
            add_rollout_methods(server, rollouts)
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        return server, bound

    try:
        server, bound = asyncio.run_coroutine_threadsafe(make(), loop).result()
    except Exception as e:
        driver.stop()
        loop.call_soon_threadsafe(loop.stop)
        if isinstance(e, RuntimeError) and "bind" in str(e).lower():  # grpc: port in use
            raise OSError(f"could not bind the gRPC server to {host}:{port} (port in use?)") from e
        raise
    if bound == 0:
        driver.stop()
        loop.call_soon_threadsafe(loop.stop)
        raise OSError(f"could not bind the gRPC server to {host}:{port} (port in use?)")
    return Server(bound, driver, server, loop, thread)


# --------------------------------------------------------------------------- client


@dataclass
class Completion:
    """One server response: generated token ids and text."""

    token_ids: list[int]
    text: str


def request_samples(address: str, *, text: Optional[str] = None,
                    token_ids: Optional[list[int]] = None, max_tokens: int = 64,
                    timeout: float = 60.0, sampling: Optional[dict] = None) -> list[Completion]:
    """Send one Decode request to a JetStream server at HOST:PORT; one Completion per sample.
    `sampling` (OpenAI field names: temperature, top_p, top_k, min_p, n, seed, stop…) travels
    as `x-flowrl-sampling` metadata; without it the server's settings apply."""
    import grpc

    if (text is None) == (token_ids is None):
        raise ValueError("give exactly one of text= or token_ids=")
    pb = js.jetstream_pb2
    if text is not None:
        req = pb.DecodeRequest(text_content=pb.DecodeRequest.TextContent(text=text),
                               max_tokens=max_tokens)
    else:
        req = pb.DecodeRequest(token_content=pb.DecodeRequest.TokenContent(token_ids=token_ids),
                               max_tokens=max_tokens)
    metadata = ((SAMPLING_METADATA_KEY, json.dumps(sampling)),) if sampling else None
    samples: list[tuple[list[int], list[str]]] = []
    with grpc.insecure_channel(address) as channel:
        stub = js.jetstream_pb2_grpc.OrchestratorStub(channel)
        for resp in stub.Decode(req, timeout=timeout, metadata=metadata):
            for i, s in enumerate(resp.stream_content.samples):
                while len(samples) <= i:
                    samples.append(([], []))
                samples[i][0].extend(s.token_ids)
                samples[i][1].append(s.text)
    return [Completion(ids, "".join(parts)) for ids, parts in samples] or [Completion([], "")]


def request(address: str, *, text: Optional[str] = None, token_ids: Optional[list[int]] = None,
            max_tokens: int = 64, timeout: float = 60.0,
            sampling: Optional[dict] = None) -> Completion:
    """Send one Decode request to a JetStream server at HOST:PORT and collect the stream (one
    sample; see `request_samples` for n > 1)."""
    return request_samples(address, text=text, token_ids=token_ids, max_tokens=max_tokens,
                           timeout=timeout, sampling=sampling)[0]
