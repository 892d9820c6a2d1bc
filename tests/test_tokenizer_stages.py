"""`nanochat tok-train` and `nanochat tok-eval` on a few tiny shards written in-process."""

from __future__ import annotations

import json
import random

import pytest

from nanochat_core import cli
from nanochat_core.data.shards import list_shards, write_shards
from nanochat_core.paths import base_dir, join
from nanochat_core.presets import get_preset
from nanochat_core.stages import tok_eval, tok_train
from nanochat_core.tokenizer import Tokenizer, load_token_bytes
from conftest import run_alone

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river mountain village 1848 2025 3.5 café naïve über 東京 — (see below) don't we'll").split()


def make_docs(n: int, seed: int, marker: str = "") -> list[str]:
    """Common words mixed with made-up ones from syllables, so there are plenty of pairs to merge."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = WORDS + ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 120))) + marker for _ in range(n)]


@pytest.fixture
def shards():
    """Four train shards and a val shard whose documents carry a word the train shards never use."""
    docs = make_docs(800, 0) + make_docs(200, 1, marker=" QQQQvalonly")
    return write_shards(docs, join(base_dir(), "base_data"), shard_chars=60_000)


def tiny(**tok_train):
    cfg = get_preset("tiny")
    return cfg.model_copy(update={"tok_train": cfg.tok_train.model_copy(update=tok_train)})


def test_train_then_eval(shards):
    assert len(list_shards(join(base_dir(), "base_data")).train) >= 2
    ref = run_alone(tok_train, tiny(vocab_size=700, max_chars=150_000), progress=False)
    out = join(base_dir(), "tokenizer")
    assert ref["path"] == out and ref["vocab_size"] == 700 and ref["merges"] == 700 - 256 - 9
    assert 150_000 <= ref["train_chars"] < 150_000 + 2_000  # stops at the document crossing max_chars
    assert ref["train_bytes"] > ref["train_chars"] and 0 < ref["unique_chunks"] < ref["train_chars"] / 4
    assert json.loads(open(join(out, "result.json")).read())["digest"] == ref["digest"]
    assert set(ref["manifest"]) == {"tokenizer.pkl", "token_bytes.pt"}
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 700 and load_token_bytes(out).shape == (700,)
    # the val shard is held out: its marker word was never seen, so it stays in small pieces
    assert len(tok.encode(" QQQQvalonly")) > 3

    ev = run_alone(tok_eval, tiny())
    assert ev["path"] == join(base_dir(), "tok_eval")
    assert ev["chars_per_token"] > 1.5 and ev["bytes_per_token"] >= ev["chars_per_token"]
    assert {"val_bytes_per_token", "train_bytes_per_token", "korean_bytes_per_token"} <= set(ev)
    table = open(join(ev["path"], "table.md")).read()
    assert "| val |" in table and "| code |" in table
    if ev["references"] == "none (offline)":
        assert "unavailable offline" in table


def test_doc_cap_crops_documents(shards):
    ref = run_alone(tok_train, tiny(vocab_size=300, max_chars=20_000, doc_cap=12), progress=False)
    assert ref["train_chars"] <= 12 * ref["train_docs"]


def test_cli_runs_tok_train(shards, capsys):
    cli.main(["tok-train", "--preset", "tiny", "--vocab-size", "300", "--max-chars", "2e4"])
    assert "tokenizer: vocab 300 (35 merges)" in capsys.readouterr().out


def test_cli_rejects_a_vocab_without_room_for_merges(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tok-train", "--vocab-size", "100"])
    assert e.value.code == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_missing_shards_and_tokenizer_are_one_line_errors(capsys):
    for argv in (["tok-train", "--preset", "tiny"], ["tok-eval", "--preset", "tiny"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_only_a_val_shard_is_an_error(capsys):
    write_shards(make_docs(10, 2), join(base_dir(), "base_data"), shard_chars=10**9)
    with pytest.raises(SystemExit):
        cli.main(["tok-train", "--preset", "tiny"])
    assert "only the val shard" in capsys.readouterr().err
