"""A tiny real-text pretraining setup for the loader and base_train tests, built in-process.

Documents are the standard library's own docstrings (real English, present wherever Python is),
each tagged `#NNNN ` with its index so a test can tell which documents a rank read.
"""

from __future__ import annotations

import functools

from nanochat_core.data.shards import write_shards
from nanochat_core.data.stdlib_text import stdlib_docs as library_docs
from nanochat_core.paths import join


@functools.cache
def stdlib_docs() -> tuple[str, ...]:
    return tuple(f"#{i:04d} {d}" for i, d in enumerate(library_docs()))


@functools.cache
def _trained_tokenizer(vocab_size: int):
    from nanochat_core.tokenizer import Tokenizer

    return Tokenizer.train(list(stdlib_docs()), vocab_size)


def make_pretraining_inputs(base: str, shard_chars: int = 120_000, vocab_size: int = 512):
    """Shards in <base>/base_data and a trained tokenizer in <base>/tokenizer; returns (shard urls, tokenizer)."""
    urls = write_shards(stdlib_docs(), join(base, "base_data"), shard_chars)
    tokenizer = _trained_tokenizer(vocab_size)
    tokenizer.save(join(base, "tokenizer"))
    return urls, tokenizer
