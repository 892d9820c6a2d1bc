"""Python side of the Rust BPE trainer: the compiled core plus the ergonomics around it.

    import tokenizer_rs
    bpe = tokenizer_rs.train(iter(texts), vocab_size=4096)       # 256 bytes + 3,840 merges
    bpe.merges[:3], bpe.mergeable_ranks()                          # -> tiktoken.Encoding

Training releases the GIL and streams the iterator in batches; inference is tiktoken's job
(`nanochat_core.tokenizer` builds the Encoding from `mergeable_ranks()` and `pattern`).
"""

from tokenizer_rs._tokenizer_rs import SPLIT_PATTERN, Bpe, split, train, version

__all__ = ["SPLIT_PATTERN", "Bpe", "split", "train", "version"]
