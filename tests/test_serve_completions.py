"""`POST /v1/completions` in-process on a tiny random-init checkpoint: echoed prompt logprobs against the
model's own log-softmax from a direct forward pass, lm-evaluation-harness's multiple-choice scoring,
token-id prompts and the tokenizer routes; and every unsupported field as a 400 naming it."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from serve_fixtures import make_tiny_checkpoint

from nanochat_core.config import ServingConfig
from nanochat_core.serve.app import create_app
from nanochat_core.serve.completion import token_string
from nanochat_core.serve.loading import load_replicas
from nanochat_core.serve.pool import ReplicaPool

CONTEXT = 128
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("completions"))
    make_tiny_checkpoint(base, seq_len=CONTEXT)
    (r,) = load_replicas(ServingConfig().inference, root=base)
    return r


@pytest.fixture(scope="module")
def client(replica):
    with TestClient(create_app(ServingConfig(), ReplicaPool([replica]))) as c:
        yield c


def logsoftmax(replica, ids: list[int]) -> torch.Tensor:
    """(T, V) log p(next | prefix) at every position, from the model's plain forward (no cache, no batch)."""
    with torch.inference_mode():
        return replica.model(torch.tensor([ids]))[0].log_softmax(-1)


def assert_error(r, param: str):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].startswith(param) and "Traceback" not in err["message"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_a_direct_forward(client, replica, max_tokens):
    tok = replica.tokenizer
    text = "The quick brown fox, café ünd 日本"
    r = client.post("/v1/completions", json={"prompt": text, "echo": True, "logprobs": 3,
                                             "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    ids = tok.encode(text)
    lp = choice["logprobs"]
    ref = logsoftmax(replica, [tok.bos_token_id, *ids])  # the server reads BOS first, as training did
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["tokens"][: len(ids)] == [token_string(tok, t) for t in ids]
    for j, t in enumerate(ids):
        assert lp["token_logprobs"][j] == pytest.approx(float(ref[j, t]), abs=1e-5)
        top = ref[j].topk(3)
        expected = {token_string(tok, int(i)): float(p) for i, p in zip(top.indices, top.values)}
        expected.setdefault(token_string(tok, t), float(ref[j, t]))
        assert lp["top_logprobs"][j] == pytest.approx(expected, abs=1e-5)
    assert choice["text"].startswith(text)
    assert [choice["text"][o:] .startswith(s) for o, s in zip(lp["text_offset"], lp["tokens"])
            if not s.startswith("bytes:")] == [True] * sum(not s.startswith("bytes:") for s in lp["tokens"])
    if max_tokens == 1:  # greedy: the generated token is the argmax after the prompt, with its logprob
        generated = int(ref[-1].argmax())
        assert lp["tokens"][-1] == token_string(tok, generated)
        assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-5)
        assert choice["finish_reason"] in ("length", "stop")
    else:
        assert choice["text"] == text and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(ids) + 1 and body["usage"]["completion_tokens"] == max_tokens


def test_lm_eval_harness_multiple_choice_scoring(client, replica):
    """What lm-evaluation-harness's `local-completions` sends for loglikelihood requests (token-id prompts,
    context + continuation, echo, logprobs 1, max_tokens 1, temperature 0) and how it reads the answer:
    sum(token_logprobs[ctxlen:-1]) and is_greedy from top_logprobs."""
    tok = replica.tokenizer
    context = tok.encode("Question: what is the capital of France?\nAnswer:")
    options = [tok.encode(" Paris"), tok.encode(" London is big"), tok.encode(" 42")]
    payload = {"model": "nanochat", "prompt": [context + o for o in options], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == len(options)
    for choice, option in zip(choices, options):
        ctxlen = len(context)
        score = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in zip(choice["logprobs"]["token_logprobs"][ctxlen:-1],
                                                                 choice["logprobs"]["top_logprobs"][ctxlen:-1]))
        ids = [tok.bos_token_id, *context, *option]
        ref = logsoftmax(replica, ids)
        expected = sum(float(ref[ctxlen + k, t]) for k, t in enumerate(option))  # ref[i] predicts ids[i+1]
        assert score == pytest.approx(expected, abs=1e-4)
        greedy = all(int(ref[ctxlen + k].argmax()) == t for k, t in enumerate(option))
        assert is_greedy == greedy


def test_token_id_prompt_with_bos_is_not_doubled_and_generation_follows(client, replica):
    tok = replica.tokenizer
    ids = [tok.bos_token_id, *tok.encode("Once upon a time")]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0, "echo": True,
                                             "logprobs": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"][0] == "<|bos|>" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert r["usage"]["prompt_tokens"] == len(ids)
    ref = logsoftmax(replica, ids)
    assert lp["token_logprobs"][1] == pytest.approx(float(ref[0, ids[1]]), abs=1e-5)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs 0: the chosen token alone
    plain = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5,
                                                 "temperature": 0}).json()
    assert r["choices"][0]["text"] == "<|bos|>Once upon a time" + plain["choices"][0]["text"]  # echo as sent
    assert plain["choices"][0]["logprobs"] is None


def test_stream_chunks_and_stop(client):
    body = {"prompt": ["alpha beta", "gamma"], "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    events = [json.loads(b[6:]) if b[6:] != "[DONE]" else "[DONE]"
              for b in client.post("/v1/completions", json=body).text.split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    for index in (0, 1):
        chunks = [c["choices"][0] for c in events[:-2] if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in chunks) == whole["choices"][index]["text"]
        assert [c["finish_reason"] for c in chunks][-1] == whole["choices"][index]["finish_reason"]
    text = whole["choices"][0]["text"]
    if len(text) >= 4:
        stop = text[2:4]
        r = client.post("/v1/completions", json={**body, "stream": False, "stop": stop}).json()
        assert r["choices"][0]["text"] == text[: text.index(stop)] and r["choices"][0]["finish_reason"] == "stop"


def test_tokenizer_routes_round_trip(client, replica):
    info = client.get("/tokenizer_info").json()
    assert info["bos_token"] == "<|bos|>" and info["eos_token"] and info["model_max_length"] == CONTEXT
    tokens = client.post("/tokenize", json={"prompt": "<|bos|>hello world", "add_special_tokens": False}).json()
    assert tokens["tokens"][0] == replica.tokenizer.bos_token_id and tokens["count"] == len(tokens["tokens"])
    assert client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"][0] == replica.tokenizer.bos_token_id
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "<|bos|>hello world"
    assert_error(client.post("/detokenize", json={"tokens": [10**6]}), "tokens")


# --- what is not supported: a 400 naming the field, never a silent drop --------------------------------

UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"top_p": 0.9}, "top_p"),
    ({"n": 2}, "n"),
]
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1, "tools": [],
           "tool_choice": "none", "response_format": {"type": "text"}, "top_p": 1, "user": "someone"}


@pytest.mark.parametrize("field, param", UNSUPPORTED)
def test_unsupported_fields_are_a_400_naming_them(client, field, param):
    assert_error(client.post("/v1/chat/completions", json={"messages": USER, **field}), param)
    assert_error(client.post("/v1/completions", json={"prompt": "Hi", **field}), param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": USER, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, "a"]]}, "prompt"),
    ("/v1/completions", {"prompt": [10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 200}, "prompt"),  # ~200 tokens in a 128-token window
    ("/v1/completions", {"prompt": ["ok"] * 129}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 32_001}, "prompt"),
    ("/v1/completions", {}, "prompt"),
])
def test_endpoint_specific_errors(client, path, body, param):
    assert_error(client.post(path, json=body), param)


def test_neutral_values_clients_send_by_default_are_accepted(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "logprobs": False, **NEUTRAL})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "best_of": 1, "suffix": None,
                                             **NEUTRAL})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_api_key_applies_to_completions_and_tokenizer(replica, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_KEY", "sekret")
    with TestClient(create_app(ServingConfig(), ReplicaPool([replica]))) as c:
        for r in (c.post("/v1/completions", json={"prompt": "Hi"}), c.post("/tokenize", json={"prompt": "Hi"}),
                  c.get("/tokenizer_info")):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                    headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
