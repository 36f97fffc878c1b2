"""An OpenAI-compatible HTTP endpoint for `flowrl-jax serve --http-port`: `/v1/models`,
`/v1/completions` and `/v1/chat/completions` (non-streaming), on the standard library's
`http.server` in a thread, so the `openai` client, our own `eval --judge` and other
standard tools can use a served model.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
request (a prompt longer than the model's context included), 404 for an unknown path or
model; the server keeps serving after any of them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flowrl_jax.sampling.completions import Completion, CompletionService
from flowrl_jax.sampling.params import SamplingError

MAX_BODY = 16 << 20  # bytes per request body


class HTTPError(Exception):
    """An error answered to the client with its status code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


class OpenAIApp:
    """The endpoint's logic, independent of the HTTP plumbing: path + JSON body → (status, JSON)."""

    def __init__(self, service: CompletionService, model_id: str):
        self.service = service
        self.model_id = model_id
        self.created = int(time.time())

    def _check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is None:
            raise HTTPError(400, "model is required", code="missing_model")
        if name != self.model_id:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves "
                                 f"{self.model_id!r}", code="model_not_found")

    def models(self) -> dict[str, Any]:
        """GET /v1/models."""
        return {"object": "list", "data": [{"id": self.model_id, "object": "model",
                                            "created": self.created, "owned_by": "flowrl-jax"}]}

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions."""
        self._check_model(body)
        sp, stop = self.service.params_from(body)
        c = self.service.complete(self.service.encode(body.get("prompt")), sp, stop)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id,
                "choices": [{"index": i, "text": ch.text, "logprobs": None,
                             "finish_reason": ch.finish_reason} for i, ch in enumerate(c.choices)],
                "usage": _usage(c)}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/chat/completions (the tokenizer's chat template renders the messages)."""
        self._check_model(body)
        sp, stop = self.service.params_from(body)
        c = self.service.complete(self.service.render_chat(body.get("messages")), sp, stop)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": ch.text},
                             "logprobs": None, "finish_reason": ch.finish_reason}
                            for i, ch in enumerate(c.choices)],
                "usage": _usage(c)}

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON reply) for one request; every failure is an OpenAI-style error."""
        path = path.split("?", 1)[0].rstrip("/")
        try:
            if method == "GET" and path == "/v1/models":
                return 200, self.models()
            if method == "GET" and path == f"/v1/models/{self.model_id}":
                return 200, self.models()["data"][0]
            routes = {"/v1/completions": self.completions, "/v1/chat/completions": self.chat}
            if path not in routes:
                raise HTTPError(404, f"no route {method} {path} (serving /v1/models, "
                                     f"/v1/completions, /v1/chat/completions)", code="not_found")
            if method != "POST":
                raise HTTPError(405, f"{path} takes POST", code="method_not_allowed")
            try:
                body = json.loads(raw.decode("utf-8") or "null")
            except (UnicodeDecodeError, ValueError) as e:
                raise HTTPError(400, f"the request body is not JSON ({e})") from e
            if not isinstance(body, dict):
                raise HTTPError(400, "the request body must be a JSON object")
            return 200, routes[path](body)
        except HTTPError as e:
            return e.status, {"error": {"message": str(e), "type": e.kind, "param": None,
                                        "code": e.code}}
        except SamplingError as e:  # a request the model cannot serve: the client's to fix
            return 400, {"error": {"message": str(e), "type": "invalid_request_error",
                                   "param": None, "code": None}}
        except Exception as e:  # noqa: BLE001 - keep serving; the client learns what happened
            return 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                   "param": None, "code": None}}


def _handler(app: OpenAIApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY:
                self.close_connection = True
                self._reply(413, {"error": {"message": f"request body over {MAX_BODY} bytes",
                                            "type": "invalid_request_error", "param": None,
                                            "code": None}})
                return
            raw = self.rfile.read(size) if size > 0 else b""
            self._reply(*app.handle(method, self.path, raw))

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request on stderr would drown the server's own messages

    return Handler


@dataclass
class HTTPServer:
    """A running OpenAI-compatible endpoint; `stop()` shuts it down."""

    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_http_server(app: OpenAIApp, *, host: str = "127.0.0.1", port: int = 8000) -> HTTPServer:
    """Serve `app` on host:port in a daemon thread; port 0 picks a free one. A busy port raises
    OSError."""
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="openai-http")
    thread.start()
    return HTTPServer(server.server_address[1], server, thread)
