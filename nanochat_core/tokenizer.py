"""The tokenizer: byte-level BPE trained by `tokenizer_rs` (Rust), run by tiktoken.

    tok = Tokenizer.train(texts, vocab_size=65_536)       # 256 bytes + 65,271 merges + 9 specials
    tok.save(paths.tokenizer_dir())                       # tokenizer.pkl + token_bytes.pt
    tok = Tokenizer.load(paths.tokenizer_dir())
    ids = tok.encode("Hello world", prepend="<|bos|>")    # or a list of str, encoded in threads
    tok.decode(ids)

Training and inference are split the way nanochat splits them: the trainer only learns merges;
tiktoken, built from those merges as mergeable ranks plus the split pattern, is the encoder (no
second encoder to keep in sync). Special tokens take the last ids, after the merges.
Conversation rendering (chat turns, masks) belongs to the post-training stages.
"""

from __future__ import annotations

import io
import pickle
from typing import TYPE_CHECKING, Iterable

import tiktoken
import tokenizer_rs

from nanochat_core import storage
from nanochat_core.errors import UserError
from nanochat_core.paths import join

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output
    "<|output_end|>",
]

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3}: nanochat measured it better at 32K vocab.
# Declared once, in the Rust crate, whose fast splitter implements exactly this pattern.
SPLIT_PATTERN: str = tokenizer_rs.SPLIT_PATTERN

PICKLE_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # at least one merge


class Tokenizer:
    """A trained tokenizer: a tiktoken Encoding with nanochat's special tokens."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")
        # What training read (texts, bytes, unique_chunks); empty for a loaded tokenizer.
        self.train_stats: dict[str, int] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
              num_threads: int | None = None) -> "Tokenizer":
        """Learn `vocab_size - 256 - 9` merges from `texts` (streamed; the GIL is released)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab size {vocab_size} leaves no room for merges: it must be at least {MIN_VOCAB_SIZE} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens + 1); pass a larger --vocab-size"
            )
        bpe = tokenizer_rs.train(texts, vocab_size - len(SPECIAL_TOKENS), pattern, num_threads=num_threads)
        tok = cls.from_bpe(bpe)
        tok.train_stats = {"texts": bpe.texts, "bytes": bpe.bytes, "unique_chunks": bpe.unique_chunks}
        return tok

    @classmethod
    def from_bpe(cls, bpe: tokenizer_rs.Bpe) -> "Tokenizer":
        """The tiktoken Encoding for a trained `tokenizer_rs.Bpe` (merges + pattern), specials appended."""
        ranks = bpe.mergeable_ranks()
        if len(ranks) != bpe.vocab_size:
            # Two merges produced the same byte string; tiktoken keys tokens by their bytes.
            raise ValueError(
                f"{bpe.vocab_size - len(ranks)} merges duplicate another token's bytes; tiktoken cannot "
                "represent this vocabulary"
            )
        specials = {name: bpe.vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="nanochat", pat_str=bpe.pattern, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    # --- persistence ---------------------------------------------------------------------------

    def save(self, dir_url: str) -> list[str]:
        """Write tokenizer.pkl and token_bytes.pt into `dir_url` (atomically); returns the file names."""
        import torch

        storage.makedirs(dir_url)
        storage.write_bytes(join(dir_url, PICKLE_FILE), pickle.dumps(self.enc))
        buf = io.BytesIO()
        torch.save(torch.tensor(self.token_byte_lengths(), dtype=torch.int32), buf)
        storage.write_bytes(join(dir_url, TOKEN_BYTES_FILE), buf.getvalue())
        return [PICKLE_FILE, TOKEN_BYTES_FILE]

    @classmethod
    def load(cls, dir_url: str) -> "Tokenizer":
        url = join(dir_url, PICKLE_FILE)
        if not storage.exists(url):
            raise UserError(f"no trained tokenizer in {dir_url}; run `nanochat tok-train` first or pass --tokenizer")
        try:
            enc = pickle.loads(storage.read_bytes(url))
        except Exception as e:  # truncated or foreign pickle: say which file and how to fix it
            raise UserError(f"{url} is not a readable tokenizer ({e}); run `nanochat tok-train` again") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise UserError(f"{url} holds a {type(enc).__name__}, not a tokenizer; run `nanochat tok-train` again")
        return cls(enc)

    # --- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        try:
            return self.enc.encode_single_token(name)
        except KeyError:
            raise ValueError(f"{name!r} is not a special token; the special tokens are {', '.join(SPECIAL_TOKENS)}") from None

    def token_byte_lengths(self) -> list[int]:
        """Bytes of every id (0 for specials), from the token bytes themselves: a token that is not
        valid UTF-8 on its own (part of a code point) still counts its true length."""
        specials = set(self.enc.special_tokens_set)
        special_ids = {self.enc.encode_single_token(s) for s in specials}
        return [0 if i in special_ids else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]

    # --- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (special-token strings in it are plain text); a list is encoded in threads.

        `prepend` / `append`: an id or a special token's name to put before / after each text.
        """
        head = [self._id(prepend)] if prepend is not None else []
        tail = [self._id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + row + tail for row in rows] if head or tail else rows
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def _id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.enc._pat_str!r})"


def load_token_bytes(dir_url: str, device="cpu") -> "torch.Tensor":
    """token_bytes.pt: int32, the byte length of every id, 0 for special tokens (for bits per byte)."""
    import torch

    url = join(dir_url, TOKEN_BYTES_FILE)
    if not storage.exists(url):
        raise UserError(f"no {TOKEN_BYTES_FILE} in {dir_url}; run `nanochat tok-train` first")
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location=device)
