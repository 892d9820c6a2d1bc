"""A tiny real-text pretraining setup for the loader and base_train tests, built in-process.

Documents are the standard library's own docstrings (real English, present wherever Python is),
each tagged `#NNNN ` with its index so a test can tell which documents a rank read.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys

from nanochat_core.data.shards import write_shards
from nanochat_core.paths import join

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


@functools.cache
def stdlib_docs(min_chars: int = 200) -> tuple[str, ...]:
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) >= min_chars:
                docs.append(doc)
    docs = list(dict.fromkeys(docs))
    return tuple(f"#{i:04d} {d}" for i, d in enumerate(docs))


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
