"""Chinese replies decode whole on every path out of the server: the chat CLI, the web page's stream and
both OpenAI endpoints, streamed and not. A scripted model (serve_fixtures.scripted_model) emits 中文，好
one raw byte per token, so every character is split across three tokens; a reply cut by max_tokens
inside a character ends in one U+FFFD on every path alike (the bytes cannot be shown; dropping them
silently would hide that the reply was cut)."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import scripted_model, tiny_tokenizer

from nanochat_core.config import ServingConfig
from nanochat_core.serve import cli
from nanochat_core.serve.app import create_app
from nanochat_core.serve.generation import Finish, SamplingParams, reply_pieces
from nanochat_core.serve.loading import Replica
from nanochat_core.serve.pool import ReplicaPool

TEXT = "中文，好"  # 12 bytes, all different: each byte token has one successor in the scripted chain
USER = [{"role": "user", "content": "说中文"}]


@pytest.fixture(scope="module")
def replica():
    tok = tiny_tokenizer()
    data = TEXT.encode()
    assert len(set(data)) == len(data)
    chain = [tok.encode_special("<|assistant_start|>"), *(tok.enc.encode_single_token(bytes([b])) for b in data),
             tok.encode_special("<|assistant_end|>")]
    model = scripted_model(tok, chain)
    return Replica(model, tok, model.lm_head.weight.device, 0)


def sse(response) -> list:
    return [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: ") and b[6:] != "[DONE]"]


def every_path(replica, max_tokens: int) -> dict[str, list[str]]:
    """The reply as each client sees it, as the list of pieces it received."""
    tok = replica.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    got = {"reply_pieces": [p.text for p in reply_pieces(replica, USER, params) if not isinstance(p, Finish)]}
    out = io.StringIO()
    cfg = ServingConfig()
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"temperature": 0.0, "max_tokens": max_tokens})})
    cli.reply(replica, USER, cfg, out)
    got["chat CLI"] = [out.getvalue().removesuffix("\n")]
    body = {"messages": USER, "temperature": 0, "max_tokens": max_tokens}
    prompt = {"prompt": [tok.bos_token_id, tok.encode_special("<|assistant_start|>")], "temperature": 0,
              "max_tokens": max_tokens}
    with TestClient(create_app(ServingConfig(), ReplicaPool([replica]))) as c:
        got["/v1/chat/completions"] = [c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]]
        got["/v1/chat/completions stream"] = [ch["choices"][0]["delta"].get("content", "")
                                              for ch in sse(c.post("/v1/chat/completions", json={**body, "stream": True}))]
        got["web page /chat/completions"] = [e["token"] for e in sse(c.post("/chat/completions", json=body)) if "token" in e]
        got["/v1/completions"] = [c.post("/v1/completions", json=prompt).json()["choices"][0]["text"]]
        got["/v1/completions stream"] = [ch["choices"][0]["text"]
                                         for ch in sse(c.post("/v1/completions", json={**prompt, "stream": True}))]
    return got


def test_whole_characters_on_every_path(replica):
    for path, pieces in every_path(replica, max_tokens=20).items():
        assert "".join(pieces) == TEXT, path
        assert all("\ufffd" not in p for p in pieces), path
    # reply_pieces (what the CLI prints as it comes) gives one piece per completed character
    assert every_path(replica, 20)["reply_pieces"] == list(TEXT)


def test_a_reply_cut_inside_a_character_ends_alike_everywhere(replica):
    got = every_path(replica, max_tokens=5)  # 中 (3 bytes) + 2 of 文's 3 bytes
    assert {path: "".join(p) for path, p in got.items()} == {path: "中\ufffd" for path in got}
