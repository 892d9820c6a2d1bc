from typing import Iterable

SPLIT_PATTERN: str
"""nanochat's split pattern: GPT-4's with numbers chunked by at most two digits."""

def version() -> str:
    """The crate version of the compiled extension."""

def train(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str | None = None,
    *,
    batch_texts: int = 8192,
    batch_bytes: int = 16 << 20,
    num_threads: int | None = None,
) -> Bpe:
    """Learn `vocab_size - 256` merges from `texts` (split with `pattern`, default SPLIT_PATTERN).

    Ties go to the smaller pair of ids, as in rustbpe; the result does not depend on
    `num_threads` (None: one thread per core). Raises ValueError for vocab_size < 256 or an
    invalid pattern, TypeError when an item is not a str (or `texts` is a single str).
    """

def split(text: str, pattern: str | None = None, fast: bool = True) -> list[str]:
    """The chunks `pattern` cuts `text` into; fast=False forces the regex engine."""

class Bpe:
    """A trained byte-level BPE: merge i (0-based) creates token 256 + i."""

    texts: int
    """Texts training read."""
    bytes: int
    """Their UTF-8 bytes."""
    unique_chunks: int
    """Unique chunks (pre-split pieces) among them."""
    @property
    def merges(self) -> list[tuple[int, int]]: ...
    @property
    def pattern(self) -> str: ...
    @property
    def vocab_size(self) -> int:
        """256 byte tokens plus one per merge."""
    def token_bytes(self) -> list[bytes]:
        """The bytes of every token id."""
    def mergeable_ranks(self) -> dict[bytes, int]:
        """token bytes -> id, the form tiktoken.Encoding takes."""
    def encode(self, text: str) -> list[int]:
        """Encode as training saw it (reference for tests; use tiktoken for inference)."""
    def decode_bytes(self, ids: list[int]) -> bytes: ...
