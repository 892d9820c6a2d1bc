"""The batched server as clients meet it: `nanochat serve` in a subprocess on 127.0.0.1 (stopped by its PID),
the official `openai` client's `completions.create` streaming and not, logprobs against a direct forward
pass, concurrent clients getting what each gets alone, unsupported fields as the client's BadRequestError."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serve_fixtures import make_tiny_checkpoint, serve_process

from nanochat_core.config import ServingConfig
from nanochat_core.serve.loading import load_replicas

KEY = "live-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("completions_live"))
    make_tiny_checkpoint(base, seq_len=1024)  # room for replies long enough to walk away from
    with serve_process(base, "--max-tokens", "24", env={"NANOCHAT_API_KEY": KEY}) as (url, proc, _):
        yield url, base


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_completions_create(client):
    r = client.completions.create(model="nanochat", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="nanochat", prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_client_echo_logprobs_equal_a_direct_forward(client, server):
    _, base = server
    (replica,) = load_replicas(ServingConfig().inference, root=base)  # the same checkpoint, fp32, in-process
    tok = replica.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    r = client.completions.create(model="nanochat", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    with torch.inference_mode():
        ref = replica.model(torch.tensor([[tok.bos_token_id, *ids]]))[0].log_softmax(-1)
    assert lp.token_logprobs == pytest.approx([float(ref[j, t]) for j, t in enumerate(ids)], abs=1e-5)
    assert all(len(top) in (2, 3) for top in lp.top_logprobs)


def test_concurrent_clients_get_what_each_gets_alone(client, server):
    """Eight requests at once share the replica's batch; at temperature 0 each gets its answer alone."""
    prompts = [f"Story number {i}: " + "once " * (i * 7) for i in range(8)]  # prompts of 4..60 tokens

    def chat(p):
        r = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": p}],
                                           max_tokens=24, temperature=0)
        return r.choices[0].message.content

    def complete(p):
        return client.completions.create(model="nanochat", prompt=p, max_tokens=24, temperature=0).choices[0].text

    alone = [(chat(p), complete(p)) for p in prompts]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        chats = pool.map(chat, prompts)
        completions = pool.map(complete, prompts)
        together = list(zip(chats, completions))
    assert together == alone
    url, _ = server
    stats = httpx.get(url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["workers"][0]["peak_rows"] > 1  # they really were decoded together


def test_unsupported_fields_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="nanochat", prompt="x", presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    ok = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        presence_penalty=0, frequency_penalty=0, logit_bias={}, n=1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_walking_away_from_a_multi_prompt_stream_frees_the_rows(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    # greedy: each of these runs to its 1,000 tokens with this model, so none ends before the client leaves
    body = {"prompt": ["a long story", "another long story", "a third"], "max_tokens": 1000, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=30, headers=auth) as c:
        before = c.get(url + "/stats").json()
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            next(r.iter_lines())  # streaming has begun; now leave
        deadline = time.time() + 20
        while time.time() < deadline:
            stats = c.get(url + "/stats").json()
            if stats["available"] == stats["replicas"] and stats["cancelled"] == before["cancelled"] + 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"rows kept decoding after the client left: {stats}")


def test_connections_through_the_serve_socket_have_nagle_off():
    """With Nagle on, each streamed reply waited ~40 ms on the client's delayed ACK before its first
    token; asyncio turns it off only on connections of a socket whose proto says TCP."""
    import asyncio
    import socket

    from nanochat_core.serve.server import bind

    async def main() -> int:
        nodelay = asyncio.get_running_loop().create_future()

        def accepted(reader, writer):
            sock = writer.get_extra_info("socket")
            nodelay.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=bind("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(nodelay, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(main()) != 0
