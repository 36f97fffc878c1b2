"""JetStream Engine API + gRPC server on 127.0.0.1: concurrent requests give the engine's greedy
tokens, malformed requests get a clear INVALID_ARGUMENT and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf
import logging

import numpy as np
import pytest

pytest.importorskip("jetstream", reason="google-jetstream is installed by `make venv` (serve extra)")
grpc = pytest.importorskip("grpc")

from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams  # noqa: E402
from flowrl_jax.testing import tiny_arch, tiny_model, word_tokenizer  # noqa: E402

EOS = 1
MAX_NEW = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    from flowrl_jax.sampling.jetstream import FlowRLEngine, start_server

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
    server = start_server(engine, host="127.0.0.1", port=0)
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


def test_concurrent_requests(served):
    core, model, _, addr = served
    from flowrl_jax.sampling.jetstream import request

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
    from flowrl_jax.sampling.jetstream import request

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
    from flowrl_jax.sampling.jetstream import request

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
                 "--json"])
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ref = _reference(core, model, [tok.encode("w3 w4", add_special_tokens=False)], 5)[0]
    assert code == 0 and [r["sample_index"] for r in recs] == [0, 1]
    assert all(r["token_ids"] == ref for r in recs)


@pytest.mark.slow
def test_serve_command_subprocess(tmp_path):
    """`flowrl-jax serve --model DIR --port 0` starts, answers a request, and is stopped."""
    import os
    import subprocess
    import sys
    import threading

    from flowrl_jax.sampling.jetstream import request
    from flowrl_jax.testing import save_hf_dir

    arch = tiny_arch(64, eos_token_id=EOS)
    save_hf_dir(tiny_model(arch, seed=3), arch, str(tmp_path), word_tokenizer(64))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl_jax.cli", "serve", "--model", str(tmp_path), "--port", "0",
         "--slots", "2", "--max-new-tokens", "8", "--max-prefill-length", "16", "--temperature", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(os.environ))
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert ready.wait(timeout=120), "".join(lines[-20:])
        port = [ln for ln in lines if "listening on" in ln][-1].split(":")[-1].split()[0]
        c = request(f"127.0.0.1:{port}", text="w1 w2", max_tokens=4, timeout=60)
        assert 0 < len(c.token_ids) <= 4
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
