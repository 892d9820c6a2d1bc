"""A tiny speedrun in Chinese: the corpus is Debian's `fortunes-zh` (Tang and Song poems, Chinese
fortunes) read with `corpus build --from`, the SFT mixture has a Chinese `custom@` conversation file;
every stage completes, tok_eval has cl100k beside ours, and `nanochat chat` and /v1/chat/completions
(streamed and not) answer the same text, decoded cleanly. 13 minutes on 2 shared cores (2026-12-05).

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
    sft_tasks = ["identity", f"custom@{convs}", "spelling:100"]
    out, table = speedrun(base, "--set", f"corpus.sources={json.dumps([str(tmp_path / 'zh')])}",
                          "--set", f"chat_sft.tasks={json.dumps(sft_tasks)}")
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
    cli.main(["-p", "你好", "--max-tokens", "24", "--temperature", "0", "--source", "auto"])
    reply = capsys.readouterr().out
    assert reply.strip() and "\ufffd" not in reply.rstrip("\n\ufffd")  # a cut last character may show as U+FFFD

    from fastapi.testclient import TestClient

    from nanochat_core.serve.app import create_app

    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 24}
    with TestClient(create_app()) as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        stream = c.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(b[6:]) for b in stream.split("\n\n") if b.startswith("data: ") and b[6:] != "[DONE]"]
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    # Not asserted: that the reply is in Chinese. At this size the post-training mixture is mostly English
    # (mid_train's and RL's tasks), and the greedy reply measured 2026-12-05 was "Here's appe's appe's ...".
    assert streamed == whole == reply.rstrip("\n")
