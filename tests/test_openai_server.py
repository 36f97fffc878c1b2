"""The OpenAI-compatible HTTP endpoint of `serve` on 127.0.0.1, in the OpenAI wire format
(urllib) and with the `openai` client package when importable: per-request temperatures,
greedy = the engine's greedy tokens, n/seed/stop, chat template, the context-length refusal
(the server stays up), and our own `eval --judge` client against it. The `openai` client is a
test dependency (pyproject's `test` extra)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from flowrl_jax.eval import judge as jg
from flowrl_jax.sampling.completions import CompletionService
from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams
from flowrl_jax.sampling.openai_http import OpenAIApp, start_http_server
from flowrl_jax.testing import tiny_arch, tiny_model, word_tokenizer

EOS = 1
MODEL_ID = "tiny-model"
CONTEXT = 1024
CHAT = ("{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}")


@pytest.fixture(scope="module")
def served():
    tok = word_tokenizer(64)
    tok.chat_template = CHAT
    arch = tiny_arch(64, eos_token_id=EOS, max_position_embeddings=CONTEXT)
    model = tiny_model(arch, seed=4, scale=3.0)  # peaked, yet temperature 1 still varies
    core = SamplingEngine(model, decode_slots=8, decode_chunk=16, prefill_buckets=(16, 64, 512),
                          eos_token_ids=[EOS], verbose=False)
    service = CompletionService(core, model, tok, SamplingParams(temperature=1.0,
                                                                 max_new_tokens=12),
                                max_new_tokens_limit=512)
    http = start_http_server(OpenAIApp(service, MODEL_ID), host="127.0.0.1", port=0)
    try:
        yield core, model, tok, f"http://127.0.0.1:{http.port}/v1"
    finally:
        http.stop()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _greedy_text(core, model, tok, ids, max_new):
    t = core.generate(model, [ids], SamplingParams(temperature=0.0, max_new_tokens=max_new))
    t = t.token_lists()[0]
    return tok.decode(t[:t.index(EOS)] if EOS in t else t, skip_special_tokens=True)


def test_models_lists_the_served_directory_name(served):
    *_, base = served
    with urllib.request.urlopen(base + "/models", timeout=30) as r:
        data = json.loads(r.read())
    assert [m["id"] for m in data["data"]] == [MODEL_ID] and data["object"] == "list"


@pytest.mark.slow
def test_per_request_temperature_and_greedy_equals_engine(served):
    core, model, tok, base = served
    prompt = "w5 w9 w11 w4"
    ref = _greedy_text(core, model, tok, tok.encode(prompt, add_special_tokens=False), 10)
    code, r = _post(base + "/completions", {"model": MODEL_ID, "prompt": prompt,
                                            "temperature": 0, "max_tokens": 10, "n": 3})
    assert code == 200 and r["object"] == "text_completion"
    assert [c["text"] for c in r["choices"]] == [ref] * 3 and ref
    assert r["usage"]["prompt_tokens"] == 4
    hot = {"model": MODEL_ID, "prompt": prompt, "temperature": 1.5, "max_tokens": 10, "n": 6,
           "seed": 7}
    code, r1 = _post(base + "/completions", hot)
    texts = [c["text"] for c in r1["choices"]]
    assert code == 200 and len(set(texts)) > 1 and any(t != ref for t in texts)
    assert [c["text"] for c in _post(base + "/completions", hot)[1]["choices"]] == texts  # seeded
    other = [c["text"] for c in _post(base + "/completions", {**hot, "seed": 8})[1]["choices"]]
    assert other != texts


def test_stop_strings_and_token_ids(served):
    core, model, tok, base = served
    ids = [7, 8, 9]
    ref = _greedy_text(core, model, tok, ids, 10)
    words = ref.split()
    assert len(words) >= 3
    code, r = _post(base + "/completions", {"model": MODEL_ID, "prompt": ids, "temperature": 0,
                                            "max_tokens": 10, "stop": [words[2]]})
    assert code == 200 and r["choices"][0]["text"] == ref[:ref.index(words[2])]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_chat_uses_the_chat_template(served):
    core, model, tok, base = served
    rendered = tok.apply_chat_template([{"role": "user", "content": "w20 w21"}], tokenize=False,
                                       add_generation_prompt=True)
    ref = _greedy_text(core, model, tok, tok.encode(rendered, add_special_tokens=False), 8)
    code, r = _post(base + "/chat/completions", {
        "model": MODEL_ID, "messages": [{"role": "user", "content": "w20 w21"}],
        "temperature": 0, "max_tokens": 8})
    assert code == 200 and r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": ref}


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": " ".join(["w4"] * (CONTEXT - 5)), "max_tokens": 10}, 400,
     "maximum context length is 1024 tokens"),
    ({"prompt": "w4", "max_tokens": 513}, 400, "exceeds this server's limit 512"),
    ({"prompt": "w4", "temperature": -1}, 400, "temperature"),
    ({"prompt": "w4", "stream": True}, 400, "stream is not supported"),
    ({"prompt": "w4", "n": "2"}, 400, "n must be an integer"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt is empty"),
    ({"prompt": "w4", "model": "gpt-4o"}, 404, "this server serves 'tiny-model'"),
])
def test_bad_requests_refused_and_the_server_stays_up(served, body, status, message):
    *_, base = served
    code, r = _post(base + "/completions", {"model": MODEL_ID, **body})
    assert code == status and message in r["error"]["message"], r
    code, r = _post(base + "/completions", {"model": MODEL_ID, "prompt": "w4", "max_tokens": 2})
    assert code == 200 and len(r["choices"]) == 1


def test_unknown_route_and_bad_json(served):
    *_, base = served
    req = urllib.request.Request(base + "/completions", data=b"{oops", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "not JSON" in json.loads(e.value.read())["error"]["message"]
    code, r = _post(base + "/embeddings", {"model": MODEL_ID})
    assert code == 404 and "/v1/chat/completions" in r["error"]["message"]


@pytest.mark.slow
def test_eval_judge_client_speaks_to_this_server(served):
    """`eval --judge` pointed at our server: the request/response shape works end to end (a
    random model never writes "Score: N", so the judge records its reply as unscored)."""
    *_, base = served
    cfg = jg.JudgeConfig(url=base, model=MODEL_ID, retries=1, backoff_s=0.0, timeout_s=300)
    reply = jg._post(cfg, {"model": MODEL_ID, "temperature": 0.0, "max_tokens": 16,
                           "messages": jg.build_messages("w3 w4", ["w5", "w6 w7"], 300)})
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    res = jg.judge_benchmark(cfg, {"p": "w3 w4"}, {"p": ["w5", "w6 w7"]})
    err = res["per_problem"]["p"]["error"]
    assert res["num_failed"] == 1 and "no score in reply" in err and "HTTP" not in err
    # a wrong FLOWRL_JUDGE_MODEL is named in the judge's error (not retried: 404)
    wrong = jg.JudgeConfig(url=base, model="gpt-4o-mini", retries=3, backoff_s=0.0)
    with pytest.raises(jg.JudgeError, match="HTTP 404: the model 'gpt-4o-mini' does not exist"):
        jg.judge_problem(wrong, "w3", ["w5"])


def _openai():
    import openai  # the standard client a user would point at `serve --http-port`

    return openai


def test_openai_client_package(served):
    openai = _openai()
    core, model, tok, base = served
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    prompt = "w5 w9 w11 w4"
    ref = _greedy_text(core, model, tok, tok.encode(prompt, add_special_tokens=False), 10)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=10)
    assert r.choices[0].text == ref
    hot = client.completions.create(model=MODEL_ID, prompt=prompt, temperature=1.5, max_tokens=10,
                                    n=6, seed=7)
    assert len({c.text for c in hot.choices}) > 1
    chat = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=8,
                                          messages=[{"role": "user", "content": "w20 w21"}])
    assert chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_ID, prompt=" ".join(["w4"] * CONTEXT), max_tokens=4)
    assert client.completions.create(model=MODEL_ID, prompt="w4", max_tokens=2).choices
