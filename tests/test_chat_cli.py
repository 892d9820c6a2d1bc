"""`nanochat chat` on a tiny checkpoint: one-shot -p, the interactive loop with /clear and /quit, a history
far longer than the context trimmed from the oldest turns (nanochat #581 crashed here), clear errors."""

from __future__ import annotations

import io
import os

import pytest
from serve_fixtures import make_tiny_checkpoint

from nanochat_core.config import ServingConfig
from nanochat_core.serve import cli
from nanochat_core.serve.loading import load_replicas

CONTEXT = 96


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("chat_base"))
    make_tiny_checkpoint(base, seq_len=CONTEXT)
    return base


@pytest.fixture(scope="module")
def replica(base):
    return load_replicas(ServingConfig().inference, root=base)[0]


def cfg_with(**inference) -> ServingConfig:
    cfg = ServingConfig()
    return cfg.model_copy(update={"inference": cfg.inference.model_copy(update=inference)})


def test_one_shot_prompt(base, replica, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    question = "What is 2+2?"
    cli.main(["-p", question, "--max-tokens", "8", "--temperature", "0", "--source", "base"])
    out = capsys.readouterr().out
    # The model's own greedy reply to that question (same checkpoint, in-process), not an echo of it.
    expected = io.StringIO()
    text, _ = cli.reply(replica, [{"role": "user", "content": question}], cfg_with(max_tokens=8, temperature=0.0),
                        expected)
    assert out == expected.getvalue() and text.strip() and question not in out


def test_session_clear_quit_and_long_history(replica):
    turns = [f"question number {i}: " + "please explain this at length " * 4 for i in range(12)]
    inp = io.StringIO("\n".join([*turns[:2], "/clear", *turns[2:], "", "/quit", "never read"]) + "\n")
    out = io.StringIO()
    cli.session(replica, cfg_with(max_tokens=24, temperature=0.8), inp, out)
    text = out.getvalue()
    assert "(conversation cleared)" in text
    assert text.count("Assistant: ") == 12  # one reply per question; the blank line asked nothing
    assert "oldest messages no longer fit the context" in text  # trimmed, not crashed


def test_session_ends_at_end_of_input(replica):
    out = io.StringIO()
    cli.session(replica, cfg_with(max_tokens=4), io.StringIO("hello\n"), out)
    assert out.getvalue().count("Assistant: ") == 1


def test_missing_checkpoint_and_bad_flag_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["-p", "hi", "--source", "sft"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoints for --source sft") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["--top-k", "500"])
    assert e.value.code == 2 and "--top-k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", os.path.join(str(tmp_path), "nowhere")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_source_auto_prefers_the_most_post_trained(base, tmp_path):
    from nanochat_core.serve.loading import checkpoint_dir

    root = str(tmp_path)
    make_tiny_checkpoint(root, family="base_checkpoints", depth=2)
    make_tiny_checkpoint(root, family="chatsft_checkpoints", depth=2)
    make_tiny_checkpoint(root, family="base_checkpoints", depth=3)
    assert checkpoint_dir(ServingConfig().inference, root)[1] == "sft d2"
    assert checkpoint_dir(cfg_with(source="base").inference, root)[1] == "base d3"  # the largest depth
    assert checkpoint_dir(cfg_with(source="base", depth=2).inference, root)[1] == "base d2"


def test_checkpoint_by_fsspec_url_and_mlflow_model_uri(tmp_path, monkeypatch, capsys):
    import shutil

    from nanochat_core import mlflow_model, tracking
    from nanochat_core.serve.loading import checkpoint_dir

    root = str(tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    ckpt = make_tiny_checkpoint(root, family="chatsft_checkpoints")
    run_id = tracking.start_pipeline_run("serve-test", {}, {})
    uri = mlflow_model.register_checkpoint(run_id, ckpt, 0, "sft")
    assert uri.startswith("models:/nanochat/")
    downloaded = checkpoint_dir(cfg_with(checkpoint="models:/nanochat@sft").inference)[0]
    assert downloaded != ckpt and sorted(os.listdir(downloaded)) == ["meta_000000.json", "model_000000.pt"]
    greedy = ["-p", "hi", "--max-tokens", "6", "--temperature", "0"]
    cli.main(["--checkpoint", "file://" + ckpt, *greedy])
    by_path = capsys.readouterr().out
    shutil.rmtree(root + "/tokenizer")  # the version carries its own copy of the checkpoint and tokenizer
    shutil.rmtree(ckpt)
    for ref in (uri, "models:/nanochat@sft"):
        cli.main(["--checkpoint", ref, *greedy])
        assert by_path.strip() and capsys.readouterr().out == by_path  # the same model either way
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", "models:/nanochat/99", "-p", "hi"])
    assert "cannot resolve models:/nanochat/99" in capsys.readouterr().err
