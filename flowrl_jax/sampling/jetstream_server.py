"""A JetStream gRPC server over `FlowRLEngine` (jetstream.py) that validates requests.

JetStream's driver threads would SIGKILL the process on any exception (jetstream_compat makes
that a failure the server's `wait` raises), so requests are validated in
the gRPC handler (`ValidatingOrchestrator`) and answered with INVALID_ARGUMENT before they
reach the driver (a prompt longer than the model's context included).

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
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Optional

from flowrl_jax.sampling.completions import (SAMPLING_METADATA_KEY, CompletionService,
                                             sampling_from_metadata)
from flowrl_jax.sampling.jetstream import FlowRLDriver, FlowRLEngine, js
from flowrl_jax.sampling.jetstream_compat import driver_failure
from flowrl_jax.sampling.params import SamplingError
from flowrl_jax.sampling.rollout_server import RolloutService, add_rollout_methods
from flowrl_jax.sampling.rollout_wire import MAX_MESSAGE_BYTES


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
