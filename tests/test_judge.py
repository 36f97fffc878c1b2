"""LLM judge against a local fake OpenAI-compatible server (127.0.0.1, ephemeral port)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flowrl_jax.eval import judge as jg


class _FakeServer:
    """Replies with a queue of (status, content) answers and records requests."""

    def __init__(self):
        self.replies: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                status, content = outer.replies.pop(0) if outer.replies else (200, "Score: 3")
                payload = (json.dumps({"choices": [{"message": {"role": "assistant",
                                                                "content": content}}]})
                           if status == 200 else content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _FakeServer()
    yield s
    s.close()


def _cfg(server, **kw):
    env = {"FLOWRL_JUDGE_URL": server.url, "FLOWRL_JUDGE_API_KEY": "test-key",
           "FLOWRL_JUDGE_MODEL": "fake", "FLOWRL_JUDGE_TIMEOUT": "5", **kw}
    cfg = jg.config_from_env(env)
    return jg.JudgeConfig(**{**cfg.__dict__, "backoff_s": 0.0})


def test_missing_config_means_off():
    assert jg.config_from_env({}) is None
    assert jg.config_from_env({"FLOWRL_JUDGE_URL": "  "}) is None
    out = jg.judge_benchmark(None, {}, {"p": ["a", "b"]})
    assert out["enabled"] is False and "FLOWRL_JUDGE_URL" in out["note"]


def test_score_parsed_and_request_well_formed(server):
    server.replies = [(200, "They all factor the quadratic.\nScore: 2")]
    cfg = _cfg(server)
    out = jg.judge_problem(cfg, "Solve x^2=1", ["sol A " * 100, "sol B"])
    assert out["score"] == 2.0 and out["attempts"] == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer test-key"
    assert req["body"]["model"] == "fake"
    assert req["body"]["messages"][0]["content"] == jg.RUBRIC
    user = req["body"]["messages"][1]["content"]
    assert "Solution 2:\nsol B" in user and ("sol A " * 100)[:300] in user
    assert ("sol A " * 100)[:301] not in user  # truncated to 300 chars


def test_bad_responses_retried_then_error(server):
    server.replies = [(500, "oops"), (200, "I cannot decide."), (200, "**Score:** 5")]
    out = jg.judge_problem(_cfg(server, FLOWRL_JUDGE_RETRIES="3"), "p", ["a", "b"])
    assert out["score"] == 5.0 and out["attempts"] == 3
    server.replies = [(200, "no number"), (200, "still nothing")]
    with pytest.raises(jg.JudgeError, match="no score"):
        jg.judge_problem(_cfg(server, FLOWRL_JUDGE_RETRIES="2"), "p", ["a"])
    server.replies = [(401, "denied"), (200, "Score: 4")]
    with pytest.raises(jg.JudgeError, match="HTTP 401"):  # auth errors are not retried
        jg.judge_problem(_cfg(server, FLOWRL_JUDGE_RETRIES="3"), "p", ["a"])
    server.replies = [(200, "not json at all")]
    bench = jg.judge_benchmark(_cfg(server, FLOWRL_JUDGE_RETRIES="1"), {"p": "x"},
                               {"p": ["a"], "q": ["b"]})
    assert bench["num_failed"] == 1 and bench["num_scored"] == 1  # q got the default "Score: 3"
    assert bench["mean_score"] == 3.0


def test_unreachable_endpoint_bounded():
    cfg = jg.JudgeConfig(url="http://127.0.0.1:9/v1", retries=2, timeout_s=1.0, backoff_s=0.0)
    with pytest.raises(jg.JudgeError, match="attempt 2"):
        jg.judge_problem(cfg, "p", ["a"])
    assert jg.config_from_env({"FLOWRL_JUDGE_URL": "http://x", "FLOWRL_JUDGE_RETRIES": "99"}
                              ).retries == jg.MAX_RETRIES


@pytest.mark.parametrize("text,score", [
    ("Score: 4", 4.0), ("blah\nscore = 1", 1.0), ("Final\n3/5", 3.0), ("I give it a 2", 2.0),
    ("Score: 7", None), ("between 1 and 5", None), ("", None), ("Score: 2\n...\nScore: 5", 5.0)])
def test_parse_score(text, score):
    assert jg.parse_score(text) == score
