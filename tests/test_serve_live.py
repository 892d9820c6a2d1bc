"""`nanochat serve` as a user runs it: a real uvicorn server in a subprocess on 127.0.0.1, driven by the
official `openai` client and by the page in headless Chromium (Debian's binary through playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
from serve_fixtures import make_tiny_checkpoint

KEY = "test-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_live")
    make_tiny_checkpoint(str(base), seq_len=1024)  # room for a reply long enough to walk away from
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    log = open(base / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_core.cli", "serve", "--port", str(port),
                             "--max-tokens", "24"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"nanochat serve exited with {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).json()["ready"]:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("nanochat serve did not become ready in 180 s")
    yield url, proc, base / "server.log"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_binds_loopback_only_by_default(server):
    url, proc, log = server
    listening = [c for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    assert "(API key required)" in log.read_text()


def test_openai_client_completion_and_stream(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["nanochat"]
    r = client.chat.completions.create(model="nanochat", max_tokens=12, temperature=0.7,
                                       messages=[{"role": "system", "content": "You are helpful."},
                                                 {"role": "user", "content": "Say hi."}])
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model="nanochat", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Count to three."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nanochat", temperature=3.0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_page_chat_streams_regenerates_and_edits(server):
    url, _, _ = server
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (scripts/setup.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: d.accept(KEY))  # the page asks for the API key on the first 401
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'nanochat · base d2'")
            # a streamed reply is seen partly written (text, no end-of-reply line yet); a buffered one never is
            page.evaluate("""() => { window.partial = false; new MutationObserver(() => {
                const body = document.querySelector('.msg.assistant .body');
                if (body && body.innerText.length && !document.querySelector('.msg.assistant .meta')) window.partial = true;
              }).observe(document.getElementById('log'), {childList: true, subtree: true}); }""")
            page.fill("#max_tokens", "64")
            page.fill("#input", "Hello there 🙂")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .meta", timeout=60_000)
            assert page.inner_text(".msg.user").startswith("Hello there 🙂")
            reply = page.inner_text(".msg.assistant .body")
            assert reply.strip() and page.evaluate("window.partial")
            assert "tokens" in page.inner_text(".msg.assistant .meta")

            page.fill("#temperature", "1.0")
            page.click(".msg.assistant .regenerate")
            page.wait_for_function(
                "(old) => { const m = document.querySelector('.msg.assistant .meta');"
                " return m && document.querySelector('.msg.assistant .body').innerText !== old; }",
                arg=reply, timeout=60_000)
            assert page.locator(".msg").count() == 2  # the reply was replaced, not appended

            page.click(".msg.user .edit")
            page.fill(".msg.user .edit-box", "An edited question")
            page.click(".msg.user .save")
            page.wait_for_selector(".msg.assistant .meta", timeout=60_000)
            assert page.inner_text(".msg.user").startswith("An edited question")
            assert page.locator(".msg").count() == 2
            assert not page.locator(".error").count()
        finally:
            browser.close()


def test_client_disconnect_frees_the_replica(server):
    url, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    # greedy: this model's reply then runs to the budget (~1,000 tokens); sampled, one in seven ended by
    # itself within 30 tokens, before the server had noticed the client leave
    body = {"messages": [{"role": "user", "content": "a long story please"}], "max_tokens": 4096, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=30, headers=auth) as client:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            next(r.iter_lines())  # the first event arrived: the replica is generating; now walk away
        deadline = time.time() + 20
        while time.time() < deadline:
            stats = client.get(url + "/stats").json()
            if stats["available"] == stats["replicas"] and stats["cancelled"] == 1:
                break  # the reply was stopped early, not generated to the end for nobody
            time.sleep(0.2)
        else:
            pytest.fail(f"the replica stayed busy after the client left: {stats}")
        ok = client.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert ok.status_code == 200


def test_page_shows_tool_calls():
    """A scripted model (tests/serve_fixtures.py) calls the calculator through the real engine; the page
    shows the call and its result as a tool block, then the text after it."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (scripts/setup.sh installs it)")
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright
    from serve_fixtures import scripted_model, tiny_tokenizer

    from nanochat_core.config import ServingConfig
    from nanochat_core.serve.app import create_app
    from nanochat_core.serve.loading import Replica
    from nanochat_core.serve.pool import ReplicaPool

    tok = tiny_tokenizer()
    s = tok.encode_special
    call = [s("<|assistant_start|>"), s("<|python_start|>"), *tok.encode("3"), *tok.encode("*"),
            *tok.encode("4"), s("<|python_end|>")]
    model = scripted_model(tok, call, [s("<|output_end|>"), *tok.encode("Done"), s("<|assistant_end|>")])
    pool = ReplicaPool([Replica(model, tok, model.lm_head.weight.device, 0, {"label": "scripted"})])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServingConfig(), pool), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.fill("#temperature", "0")
                page.fill("#input", "What is 3*4?")
                page.press("#input", "Enter")
                page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
                assert page.inner_text(".msg.assistant .tool .code") == "3*4"
                assert page.inner_text(".msg.assistant .tool .out").strip() == "→ 12"
                assert page.inner_text(".msg.assistant .body").rstrip().endswith("Done")
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_taken_port_is_a_one_line_error(capsys):
    from nanochat_core.serve import server as serve_cmd

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as e:
            serve_cmd.main(["--port", str(taken.getsockname()[1])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
