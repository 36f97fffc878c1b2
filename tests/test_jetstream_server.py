"""JetStream Engine API + gRPC server on 127.0.0.1: concurrent requests give the engine's greedy
tokens, malformed requests get a clear INVALID_ARGUMENT and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging

import numpy as np
import pytest

pytest.importorskip("jetstream", reason="google-jetstream is installed by `make venv` (serve extra)")
grpc = pytest.importorskip("grpc")

from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams  # noqa: E402
from flowrl_jax.sampling.params import SamplingError  # noqa: E402
from flowrl_jax.testing import tiny_arch, tiny_model, word_tokenizer  # noqa: E402

EOS = 1
MAX_NEW = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    from flowrl_jax.sampling.completions import CompletionService
    from flowrl_jax.sampling.jetstream import FlowRLEngine
    from flowrl_jax.sampling.jetstream_server import start_server

    assert (root.level, list(root.handlers)) == before  # compat restored the root logger
    tok = word_tokenizer(64)
    tok_dir = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(tok_dir)
    arch = tiny_arch(64, eos_token_id=EOS)
    model = tiny_model(arch, seed=2)
    core = SamplingEngine(model, decode_slots=4, decode_chunk=8, prefill_buckets=(16,),
                          verbose=False)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    engine = FlowRLEngine(core, model, tok, str(tok_dir), sampling, max_prefill_length=32, slots=4)
    service = CompletionService(core, model, tok, sampling, max_new_tokens_limit=MAX_NEW)
    server = start_server(engine, host="127.0.0.1", port=0, service=service)
    try:
        yield core, model, tok, f"127.0.0.1:{server.port}"
    finally:
        server.stop()


def _reference(core, model, prompts, max_new):
    """Greedy tokens from the engine's own generate, cut before the stop token (JetStream
    does not return it)."""
    out = core.generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new))
    refs = []
    for t in out.token_lists():
        refs.append(t[:t.index(EOS)] if EOS in t else t)
    return refs


def test_compat_fixes_applied():
    import sys

    import jax

    from flowrl_jax.sampling.jetstream_compat import import_jetstream

    js = import_jetstream()
    assert hasattr(jax, "tree_map")
    assert "seqio.vocabularies" in sys.modules
    assert issubclass(js.engine_api.Engine, object) and hasattr(js.engine_api, "ResultTokens")


def test_jetstream_info_chatter_is_dropped_its_warnings_kept(caplog):
    """JetStream logs every request at INFO on the root logger (86k lines per demo)."""
    import jetstream.core.orchestrator as orch

    from flowrl_jax.sampling.jetstream_compat import import_jetstream

    import_jetstream()
    with caplog.at_level(logging.INFO):
        logging.info("from the test: kept")

        def in_jetstream(level, msg):  # a record whose code lives in JetStream's package
            logging.getLogger().handle(logging.LogRecord("root", level, orch.__file__, 1, msg,
                                                         None, None))

        in_jetstream(logging.INFO, "Prefilling on prefill engine 0")
        in_jetstream(logging.WARNING, "jetstream warning")
    msgs = [r.getMessage() for r in caplog.records]
    assert "from the test: kept" in msgs and "jetstream warning" in msgs
    assert "Prefilling on prefill engine 0" not in msgs


def test_a_failing_driver_thread_is_reported_not_a_sigkill():
    # JetStream's own thread class SIGKILLs the process (a trainer, a pytest worker) on any error
    import threading

    from flowrl_jax.sampling.jetstream_compat import DriverThread, driver_failure, import_jetstream

    assert import_jetstream().orchestrator.JetThread is DriverThread

    class FakeDriver:
        live = True

        def _generate_thread(self, idx):
            raise RuntimeError(f"boom {idx}")

    for live, expected in ((True, "its generate-0 thread failed: RuntimeError: boom 0"),
                           (False, None)):
        driver = FakeDriver()
        driver.live = live  # False: the error is JetStream's stop() racing its own threads
        t = DriverThread(target=functools.partial(driver._generate_thread, 0), name="generate-0")
        t.start()
        t.join(10)
        assert not t.is_alive() and driver_failure(driver) == expected
    assert threading.current_thread().is_alive()  # still here: no SIGKILL


def test_server_wait_raises_when_the_driver_fails():
    import asyncio
    import threading
    import types

    from flowrl_jax.sampling.jetstream_server import Server

    class NeverEnding:  # a gRPC server that serves until stopped
        def __init__(self):
            self.stopped = asyncio.Event()

        async def wait_for_termination(self):
            await self.stopped.wait()

        async def stop(self, grace):
            self.stopped.set()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stopped = []
    driver = types.SimpleNamespace(flowrl_failure=None, stop=lambda: stopped.append(True))
    server = Server(0, driver, NeverEnding(), loop, thread)
    fail = "its detokenize-0 thread failed: X"
    threading.Timer(0.3, lambda: setattr(driver, "flowrl_failure", fail)).start()
    with pytest.raises(SamplingError, match="driver stopped serving: its detokenize-0 thread failed"):
        server.wait()
    assert stopped and not thread.is_alive()


def test_concurrent_requests(served):
    core, model, _, addr = served
    from flowrl_jax.sampling.jetstream_client import request

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, size=n).tolist() for n in (3, 5, 1, 8, 2, 6, 4, 7, 9, 3)]
    budgets = [MAX_NEW, 5, MAX_NEW, 3, MAX_NEW, 8, 1, MAX_NEW, 6, 2]
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        futs = [ex.submit(request, addr, token_ids=p, max_tokens=b, timeout=120)
                for p, b in zip(prompts, budgets)]
        got = [f.result(timeout=180).token_ids for f in futs]
    refs = _reference(core, model, prompts, MAX_NEW)
    for g, r, b in zip(got, refs, budgets):
        assert g == r[:b]
    assert any(len(g) == MAX_NEW for g in got)  # some requests run to the limit


def test_text_request(served):
    core, model, tok, addr = served
    from flowrl_jax.sampling.jetstream_client import request

    text = "w1 w7 w3 w12"
    c = request(addr, text=text, max_tokens=MAX_NEW, timeout=120)
    ref = _reference(core, model, [tok.encode(text, add_special_tokens=False)], MAX_NEW)[0]
    assert c.token_ids == ref and len(ref) > 0
    assert c.text == "".join(tok.decode([t]) for t in ref)


@pytest.mark.parametrize("kwargs,message", [
    (dict(token_ids=[5, 999]), "id 999 is outside the vocabulary"),
    (dict(token_ids=[]), "token_ids is empty"),
    (dict(text=""), "text is empty"),
    (dict(text="w1 w2", max_tokens=0), "max_tokens must be > 0"),
    (dict(text="w1", max_tokens=MAX_NEW + 1), "exceeds this server's limit"),
    (dict(text=" ".join(["w4"] * 40)), "at most 32"),
])
def test_malformed_requests_get_clear_errors(served, kwargs, message):
    _, _, _, addr = served
    from flowrl_jax.sampling.jetstream_client import request

    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(grpc.RpcError) as err:
        request(addr, timeout=60, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    # and the server keeps serving
    assert len(request(addr, token_ids=[7, 8], max_tokens=2, timeout=60).token_ids) <= 2


def test_health_and_missing_content(served):
    _, _, _, addr = served
    from flowrl_jax.sampling.jetstream import js

    with grpc.insecure_channel(addr) as ch:
        stub = js.jetstream_pb2_grpc.OrchestratorStub(ch)
        assert stub.HealthCheck(js.jetstream_pb2.HealthCheckRequest(), timeout=30).is_live
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(js.jetstream_pb2.DecodeRequest(max_tokens=3), timeout=30))
        assert "neither text_content nor token_content" in err.value.details()


def test_sample_cli_client(served, capsys):
    """`flowrl-jax sample --server` talks to the server and prints JSON lines."""
    import json

    from flowrl_jax.cli import main

    core, model, tok, addr = served
    code = main(["sample", "--server", addr, "--prompt", "w3 w4", "--n", "2", "--max-new-tokens", "5",
                 "--temperature", "0", "--json"])
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ref = _reference(core, model, [tok.encode("w3 w4", add_special_tokens=False)], 5)[0]
    assert code == 0 and [r["sample_index"] for r in recs] == [0, 1]
    assert all(r["token_ids"] == ref for r in recs)


def test_sample_server_honours_temperature(served, capsys):
    """`sample --server --temperature T --seed S` gives what local sampling with the same
    settings gives (it used to be silently the server's greedy setting)."""
    import json

    from flowrl_jax.cli import main

    core, model, tok, addr = served
    ids = tok.encode("w3 w4", add_special_tokens=False)
    sp = SamplingParams(temperature=1.5, n=4, seed=5, max_new_tokens=6)
    local = [t[:t.index(EOS)] if EOS in t else t
             for t in core.generate(model, [ids], sp).token_lists()]
    assert main(["sample", "--server", addr, "--prompt", "w3 w4", "--n", "4", "--seed", "5",
                 "--max-new-tokens", "6", "--temperature", "1.5", "--json"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in recs] == local
    greedy = _reference(core, model, [ids], 6)[0]
    assert any(t != greedy for t in local)  # the temperature had an effect


def test_grpc_per_request_settings_and_context_refusal(served):
    core, model, tok, addr = served
    from flowrl_jax.sampling.jetstream_client import request, request_samples

    ids = [5, 9, 13]
    got = request_samples(addr, token_ids=ids, max_tokens=MAX_NEW, timeout=120,
                          sampling={"temperature": 0, "n": 2})
    assert [c.token_ids for c in got] == _reference(core, model, [ids, ids], MAX_NEW)
    with pytest.raises(grpc.RpcError) as err:
        request(addr, token_ids=[4] * 40, max_tokens=MAX_NEW, timeout=60,
                sampling={"temperature": 0.5})  # validated like any request: too long
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 32" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        request(addr, token_ids=[4], max_tokens=2, timeout=60, sampling={"top_p": 2})
    assert "top_p" in err.value.details()
    assert len(request(addr, token_ids=[7, 8], max_tokens=2, timeout=60).token_ids) <= 2


def test_context_length_refused_per_request(tmp_path):
    """A prompt + max_tokens beyond max_position_embeddings is INVALID_ARGUMENT, not a crash."""
    from flowrl_jax.sampling.jetstream import FlowRLEngine, js

    tok = word_tokenizer(64)
    arch = tiny_arch(64, eos_token_id=EOS, max_position_embeddings=24)
    model = tiny_model(arch, seed=2)
    core = SamplingEngine(model, decode_slots=2, decode_chunk=4, prefill_buckets=(16,),
                          verbose=False)
    engine = FlowRLEngine(core, model, tok, str(tmp_path), SamplingParams(max_new_tokens=8),
                          max_prefill_length=32, slots=2)
    pb = js.jetstream_pb2
    req = pb.DecodeRequest(token_content=pb.DecodeRequest.TokenContent(token_ids=[4] * 16),
                           max_tokens=8)
    assert engine.validate_request(req) is None  # 16 + 8 = 24 fits
    req.token_content.token_ids.append(4)
    assert "maximum context length is 24" in engine.validate_request(req)


def test_sample_unreachable_server_one_line(capsys):
    import socket

    from flowrl_jax.cli import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["sample", "--server", f"127.0.0.1:{port}", "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_command_subprocess(tmp_path):
    """`flowrl-jax serve --model DIR --port 0` starts, answers a request, and is stopped."""
    import os
    import subprocess
    import sys
    import threading

    from flowrl_jax.sampling.jetstream_client import request
    from flowrl_jax.testing import save_hf_dir

    arch = tiny_arch(64, eos_token_id=EOS)
    save_hf_dir(tiny_model(arch, seed=3), arch, str(tmp_path), word_tokenizer(64))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl_jax.cli", "serve", "--model", str(tmp_path), "--port", "0",
         "--http-port", "0", "--slots", "2", "--max-new-tokens", "8", "--max-prefill-length", "16",
         "--temperature", "0", "--devices", "auto", "--dtype", "auto"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(os.environ))
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stderr:
            lines.append(line)
            if "OpenAI-compatible API on" in line:  # printed after the gRPC line
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert ready.wait(timeout=120), "".join(lines[-20:])
        port = [ln for ln in lines if "listening on" in ln][-1].split(":")[-1].split()[0]
        c = request(f"127.0.0.1:{port}", text="w1 w2", max_tokens=4, timeout=60)
        assert 0 < len(c.token_ids) <= 4
        assert "float32, 1 device(s)" in "".join(lines)  # --dtype/--devices auto on CPU
        base = [ln for ln in lines if "OpenAI-compatible" in ln][-1].split(" on ")[1].split()[0]
        import json
        import urllib.request

        with urllib.request.urlopen(base + "/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == tmp_path.name
        req = urllib.request.Request(base + "/completions", method="POST", data=json.dumps(
            {"model": tmp_path.name, "prompt": "w1 w2", "max_tokens": 4, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["choices"][0]["finish_reason"] in ("stop", "length")

        # a second serve on the same (busy) port: one line, exit 2
        busy = subprocess.run([sys.executable, "-m", "flowrl_jax.cli", "serve", "--model",
                               str(tmp_path), "--port", port, "--max-new-tokens", "8",
                               "--max-prefill-length", "16"],
                              capture_output=True, text=True, timeout=180)
        assert busy.returncode == 2 and "could not bind" in busy.stderr, busy.stderr[-2000:]
        assert "Traceback" not in busy.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
