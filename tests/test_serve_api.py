"""The serving API in-process (FastAPI's TestClient) on a tiny random-init checkpoint: response schemas,
input limits as OpenAI-shaped 4xx errors, trimming of over-long history, stop strings, UTF-8 safe
streaming, the optional API key."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import make_tiny_checkpoint

from nanochat_core.config import ServingConfig
from nanochat_core.serve.app import create_app
from nanochat_core.serve.generation import _Output, fit_prompt
from nanochat_core.serve.loading import load_replicas
from nanochat_core.serve.pool import ReplicaPool

CONTEXT = 128
USER = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("serve_base"))
    make_tiny_checkpoint(base, seq_len=CONTEXT)
    return load_replicas(ServingConfig().inference, root=base)


@pytest.fixture(scope="module")
def client(replicas):
    with TestClient(create_app(ServingConfig(), ReplicaPool(replicas))) as c:
        yield c


def sse(response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded ([DONE] kept as a string)."""
    out = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


# --- schemas ----------------------------------------------------------------------------------------


def test_non_stream_completion_schema(client):
    r = client.post("/v1/chat/completions", json={"model": "nanochat", "messages": USER, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "nanochat" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_completion_schema(client):
    completed = client.get("/stats").json()["completed"]
    r = client.post("/v1/chat/completions", json={
        "model": "nanochat", "messages": USER, "max_tokens": 10, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] <= 10
    final = chunks[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and final["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert client.get("/stats").json()["completed"] == completed + 1


def test_native_stream_schema(client):
    r = client.post("/chat/completions", json={"messages": USER, "max_tokens": 8, "temperature": 0})
    events = sse(r)
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] <= 8
    assert all(set(e) == {"token", "kind"} and e["kind"] == "text" for e in events[:-1])


def test_greedy_is_deterministic_and_seeded_sampling_repeats(client):
    def content(**kw):
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 16, **kw})
        return r.json()["choices"][0]["message"]["content"]

    assert content(temperature=0) == content(temperature=0)
    assert content(temperature=1.0, seed=7) == content(temperature=1.0, seed=7)


def test_stop_string_ends_the_reply_before_it(client):
    req = {"messages": USER, "max_tokens": 40, "temperature": 0}
    full = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    r = client.post("/v1/chat/completions", json={**req, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    streamed = sse(client.post("/v1/chat/completions", json={**req, "stop": stop, "stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1])
    assert text == full[: full.index(stop)]


def test_models_health_stats(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["nanochat"]
    assert client.get("/v1/models/nanochat").json()["id"] == "nanochat"
    assert client.get("/health").json() == {"status": "ok", "ready": True, "model": "nanochat",
                                            "checkpoint": "base d2", "replicas": 1}
    stats = client.get("/stats").json()
    assert stats["replicas"] == 1 and stats["available"] == 1 and stats["context_len"] == CONTEXT
    assert stats["completed"] >= 1 and stats["failed"] == 0


def test_page_is_served_without_external_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "chat/completions" in r.text
    for external in ("http://", "https://", "//cdn"):
        assert external not in r.text  # works offline: nothing fetched from elsewhere


# --- limits and bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"messages": USER * 0}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 501}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3},
     "messages"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "top_k": 201}, "top_k"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 4097}, "max_tokens"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "top_p": 0.5}, "top_p"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": [{"role": "tool", "content": "x"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({}, "messages"),
])
def test_limits_return_openai_errors(client, body, param):
    for path in ("/v1/chat/completions", "/chat/completions"):
        if path == "/chat/completions" and param == "n":
            continue  # an OpenAI-only field
        assert_error(client.post(path, json=body), 400, param)


def test_bad_json_unknown_model_and_routes(client):
    assert_error(client.post("/v1/chat/completions", content=b"{not json"), 400)
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    assert_error(client.post("/v1/chat/completions", content=b"\xff\xfe"), 400)
    assert_error(client.post("/v1/chat/completions", content=b"{" + b" " * (1 << 20) + b"}"), 413)
    assert_error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}), 404,
                 "model", "model_not_found")
    assert_error(client.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_system_and_content_parts_are_accepted(client):
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        {"role": "user", "content": "again"}], "max_tokens": 3, "top_p": 1.0, "max_completion_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2  # max_completion_tokens wins over max_tokens


# --- context window ---------------------------------------------------------------------------------


def test_over_long_history_is_trimmed_not_a_crash(client):
    history = []
    for i in range(30):  # ~30 × 60 tokens: far beyond the 128-token context
        history += [{"role": "user", "content": f"question {i}: " + "tell me more " * 20},
                    {"role": "assistant", "content": "answer " * 20}]
    history.append({"role": "user", "content": "and finally?"})
    events = sse(client.post("/chat/completions", json={"messages": history, "max_tokens": 20}))
    done = events[-1]
    assert done["done"] and done["dropped_messages"] >= 58 and done["dropped_messages"] % 2 == 0
    assert done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"] <= CONTEXT
    one_long = [{"role": "user", "content": "word " * 1600}]  # 8,000 characters in one message
    r = client.post("/v1/chat/completions", json={"messages": one_long, "max_tokens": 4096})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT


def test_fit_prompt_drops_whole_turns_oldest_first(replicas):
    tok = replicas[0].tokenizer
    msgs = [{"role": "user", "content": "first " * 40}, {"role": "assistant", "content": "reply " * 40},
            {"role": "user", "content": "last question"}]
    ids, budget, dropped = fit_prompt(tok, msgs, context_len=64, max_tokens=16)
    assert dropped == 2 and tok.decode(ids).count("last question") == 1 and "first" not in tok.decode(ids)
    assert budget == 16 and len(ids) + budget <= 64
    ids, budget, dropped = fit_prompt(tok, msgs, context_len=4096, max_tokens=16)
    assert dropped == 0 and "first" in tok.decode(ids)


# --- UTF-8 safe streaming ---------------------------------------------------------------------------


def test_multibyte_characters_are_never_split(replicas):
    tok = replicas[0].tokenizer
    text = "emoji 🙂🚀🎉 日本語 café ∑"
    ids = tok.encode(text)
    pieces_bytes = [tok.enc.decode_single_token_bytes(i) for i in ids]
    assert any(_incomplete(b) for b in pieces_bytes), "the fixture should split some character across tokens"
    out = _Output([])
    pieces = []
    for b in pieces_bytes:
        got, _ = out.feed(b)
        pieces += [p.text for p in got]
    pieces += [p.text for p in out.flush()[0]]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # byte by byte: still whole characters only
    out = _Output([])
    chars = []
    for byte in text.encode():
        chars += [p.text for p in out.feed(bytes([byte]))[0]]
    assert "".join(chars) == text and all("\ufffd" not in c for c in chars)


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stop_string_held_back_across_pieces():
    out = _Output(["STOP"])
    first, hit = out.feed(b"hello ST")
    assert [p.text for p in first] == ["hello "] and not hit  # "ST" might begin STOP
    second, hit = out.feed(b"ay")
    assert [p.text for p in second] == ["STay"] and not hit
    third, hit = out.feed(b" then STOP here")
    assert [p.text for p in third] == [" then "] and hit


# --- API key ----------------------------------------------------------------------------------------


def test_api_key_is_required_when_set(replicas, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_KEY", "sekret")  # the only place a key comes from: never a config field
    with TestClient(create_app(ServingConfig(), ReplicaPool(replicas))) as c:
        body = {"messages": USER, "max_tokens": 2}
        assert_error(c.post("/v1/chat/completions", json=body), 401, code="invalid_api_key")
        assert_error(c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/models"), 401)
        ok = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    with TestClient(create_app(ServingConfig(), ReplicaPool(replicas))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_full_queue_answers_429(replicas):
    pool = ReplicaPool(replicas, max_queue=1)
    pool.waiting = 1  # as if one request already waits for the only replica
    with TestClient(create_app(ServingConfig(), pool)) as c:
        assert_error(c.post("/v1/chat/completions", json={"messages": USER}), 429, code="queue_full")


def test_factory_loads_the_model_at_startup_not_import(tmp_path, monkeypatch):
    make_tiny_checkpoint(str(tmp_path), seq_len=CONTEXT, family="chatsft_checkpoints")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    app = create_app()  # what `uvicorn --factory nanochat_core.serve.app:create_app` calls
    assert app.state.pool is None
    with TestClient(app) as c:  # startup: --source auto finds the SFT checkpoint
        assert c.get("/health").json()["checkpoint"] == "sft d2"
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


# --- tool calls -------------------------------------------------------------------------------------


def test_tool_call_is_streamed_as_parts_and_rendered_for_openai(replicas):
    from serve_fixtures import scripted_model

    from nanochat_core.serve.generation import Finish, SamplingParams, reply_pieces
    from nanochat_core.serve.loading import Replica

    tok = replicas[0].tokenizer
    s = tok.encode_special
    three, plus, four, done = (tok.encode(t) for t in ("3", "+", "4", "Done"))
    assert all(len(t) == 1 for t in (three, plus, four)) and len(done) >= 1
    # after <|assistant_start|>: a calculator call 3+4, then (after the engine forces the result) text, then end
    call = [s("<|assistant_start|>"), s("<|python_start|>"), *three, *plus, *four, s("<|python_end|>")]
    # the engine forces <|output_start|>7<|output_end|> after <|python_end|>; the model goes on from there
    after = [s("<|output_end|>"), *done, s("<|assistant_end|>")]
    model = scripted_model(tok, call, after)
    replica = Replica(model, tok, model.lm_head.weight.device, 0)
    items = list(reply_pieces(replica, USER, SamplingParams(temperature=0.0, max_tokens=30)))
    *pieces, finish = items
    assert isinstance(finish, Finish) and finish.reason == "stop"
    merged: list[list[str]] = []
    for p in pieces:  # one piece per token; join runs of one kind
        if merged and merged[-1][0] == p.kind:
            merged[-1][1] += p.text
        else:
            merged.append([p.kind, p.text])
    assert merged == [["python", "3+4"], ["python_output", "7"], ["text", "Done"]]

    with TestClient(create_app(ServingConfig(), ReplicaPool([replica]))) as c:
        body = {"messages": USER, "temperature": 0, "max_tokens": 30}
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["message"]["content"] == "<<3+4=7>>Done"
        events = sse(c.post("/chat/completions", json=body))
        assert [(e["kind"], e["token"]) for e in events[:-1]] == [(p.kind, p.text) for p in pieces]
        chunks = sse(c.post("/v1/chat/completions", json={**body, "stream": True}))
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]) == "<<3+4=7>>Done"
