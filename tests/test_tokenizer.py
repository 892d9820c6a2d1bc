"""The Rust BPE trainer against a slow pure-Python BPE and against rustbpe; the tiktoken export
against the trainer's own view of the merges; round trips; bad input."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import regex
import tokenizer_rs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat_core.errors import UserError
from nanochat_core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, load_token_bytes

# Small texts that reach every branch of the split pattern and of the merge bookkeeping:
# overlapping pairs (aaaa, abab), unicode letters and numbers, whitespace runs, empty documents.
TEXTS = [
    "hello hello hello world, the world says hello to the whole wide world",
    "aaaaaaa aaaa aa a abababab bababa aaab",
    "numbers 1234567 and 3.14159, ٣٤٥٦ and ½ of 2025-11-22",
    "   whitespace\t\truns \n\n\n and\r\nnewlines   \u3000\u00a0 end",
    "",
    "naïve café 北京欢迎你 😀😀😀 it's they'll we've you're I'D O'Neil",
    "",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n",
]


def python_bpe(texts: list[str], num_merges: int, pattern: str = SPLIT_PATTERN) -> list[tuple[int, int]]:
    """The slow reference: split with the `regex` module, then recount all pairs before every merge.
    Highest count wins; ties go to the smaller (left, right) pair, as in rustbpe."""
    words = Counter()
    for text in texts:
        for chunk in regex.findall(pattern, text):
            words[tuple(chunk.encode("utf-8"))] += 1
    seqs = [(list(w), n) for w, n in words.items()]
    merges = []
    for i in range(num_merges):
        pairs = Counter()
        for ids, n in seqs:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new = 256 + i
        for k, (ids, n) in enumerate(seqs):
            out, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            seqs[k] = (out, n)
        merges.append(best)
    return merges


def test_merges_match_the_python_reference():
    bpe = tokenizer_rs.train(iter(TEXTS), 256 + 150)
    assert bpe.merges == python_bpe(TEXTS, 150)


def test_runs_out_of_pairs_gracefully():
    bpe = tokenizer_rs.train(["abc", "", "abc"], 10_000)
    assert bpe.merges == [(97, 98), (256, 99)]
    assert bpe.vocab_size == 258
    assert (bpe.texts, bpe.bytes, bpe.unique_chunks) == (3, 6, 1)


def test_other_patterns_use_the_regex_engine():
    pattern = r"\w+|\s+|[^\w\s]+"
    bpe = tokenizer_rs.train(TEXTS, 256 + 80, pattern)
    assert bpe.pattern == pattern
    assert bpe.merges == python_bpe(TEXTS, 80, pattern)


def test_deterministic_whatever_the_threads_and_batches():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "ünïcode", "12", "345", "!!", "\n", "  "]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    runs = [
        tokenizer_rs.train(texts, 600, num_threads=1).merges,
        tokenizer_rs.train(texts, 600, num_threads=4, batch_texts=7).merges,
        tokenizer_rs.train(iter(texts), 600, batch_texts=1, batch_bytes=1).merges,
    ]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == python_bpe(texts, 600 - 256)


def test_merge_for_merge_with_rustbpe():
    rustbpe = pytest.importorskip("rustbpe")
    rng = random.Random(1)
    alphabet = "abcdefghij klmn\n\t 0123456789 éß北京 .,;!?'"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(400)]
    texts += TEXTS
    ours = tokenizer_rs.train(texts, 1500)
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(texts), 1500, pattern=SPLIT_PATTERN)
    theirs = [bytes(b) for b, _ in sorted(ref.get_mergeable_ranks(), key=lambda kv: kv[1])]
    assert ours.token_bytes() == theirs


# --- split pattern -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_fast_split_equals_the_regex_engine(text):
    fast = tokenizer_rs.split(text)
    assert fast == tokenizer_rs.split(text, fast=False)
    assert "".join(fast) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aZ'sStTlLvVeErR \t\n\r1٣!.-é\u00a0", max_size=40))
def test_fast_split_on_pattern_corner_cases(text):
    assert tokenizer_rs.split(text) == tokenizer_rs.split(text, fast=False) == regex.findall(SPLIT_PATTERN, text)


# --- the tiktoken export -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    texts = TEXTS * 3 + [f"line {i}: the quick brown fox jumps over {i * 7} lazy dogs" for i in range(200)]
    bpe = tokenizer_rs.train(texts, 700)
    return bpe, Tokenizer.from_bpe(bpe)


def test_tiktoken_encodes_like_the_trainer(trained):
    bpe, tok = trained
    for text in TEXTS + ["the quick brown fox", "aaaaaaaaab", "北京 café 12345"]:
        assert tok.encode(text) == bpe.encode(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_round_trip_and_export_agree(trained, text):
    bpe, tok = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == bpe.encode(text)
    assert bpe.decode_bytes(ids) == text.encode("utf-8")


def test_specials_take_the_last_ids(trained):
    bpe, tok = trained
    assert tok.vocab_size == bpe.vocab_size + len(SPECIAL_TOKENS)
    assert tok.bos_token_id == bpe.vocab_size == tok.encode_special("<|bos|>")
    assert tok.encode_special("<|output_end|>") == tok.vocab_size - 1
    assert tok.encode("<|bos|>") != [tok.bos_token_id]  # specials in text stay text
    ids = tok.encode("hi", prepend="<|bos|>", append=tok.bos_token_id)
    assert ids[0] == ids[-1] == tok.bos_token_id and ids[1:-1] == tok.encode("hi")
    rows = tok.encode(["hi there", "", "x"], prepend=tok.bos_token_id, num_threads=2)
    assert [r[0] for r in rows] == [tok.bos_token_id] * 3 and rows[1] == [tok.bos_token_id]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|nope|>")


def test_save_load_and_token_bytes(tmp_path, trained):
    import torch

    bpe, tok = trained
    tok.save(str(tmp_path / "tok"))
    again = Tokenizer.load(str(tmp_path / "tok"))
    assert again.encode("the quick brown fox 123") == tok.encode("the quick brown fox 123")
    tb = load_token_bytes(str(tmp_path / "tok"))
    assert tb.dtype == torch.int32 and tb.shape == (tok.vocab_size,)
    raw = bpe.token_bytes()
    assert tb[: len(raw)].tolist() == [len(b) for b in raw]
    assert tb[len(raw):].tolist() == [0] * len(SPECIAL_TOKENS)
    # tokens that are not valid UTF-8 on their own (part of a code point) count their true bytes
    partial = [i for i, b in enumerate(raw) if len(b) > 1 and not _utf8(b)]
    assert partial, "the fixture text should produce a token that splits a code point"
    assert all(tb[i].item() == len(raw[i]) for i in partial)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_load_reports_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="run `nanochat tok-train`"):
        Tokenizer.load(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable tokenizer"):
        Tokenizer.load(str(tmp_path / "bad"))


# --- bad input -----------------------------------------------------------------------------------


def test_vocab_too_small():
    with pytest.raises(UserError, match="at least 266"):
        Tokenizer.train(TEXTS, 265)
    with pytest.raises(ValueError, match="at least 256"):
        tokenizer_rs.train(TEXTS, 255)


def test_invalid_pattern():
    with pytest.raises(ValueError, match="invalid split pattern"):
        tokenizer_rs.train(TEXTS, 300, "(unclosed")
    with pytest.raises(ValueError, match="invalid split pattern"):
        tokenizer_rs.split("x", "[")


def test_non_string_items():
    with pytest.raises(TypeError, match="item 2 is <class 'int'>"):
        tokenizer_rs.train(["a", "b", 3, "d"], 300)
    with pytest.raises(TypeError, match="item 0 is <class 'bytes'>"):
        tokenizer_rs.train([b"bytes"], 300)
    with pytest.raises(TypeError, match="iterable of str"):
        tokenizer_rs.train(42, 300)
    with pytest.raises(TypeError, match="not a single str"):
        tokenizer_rs.train("one long text", 300)


def test_iterator_errors_propagate():
    def texts():
        yield "fine"
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        tokenizer_rs.train(texts(), 300)
