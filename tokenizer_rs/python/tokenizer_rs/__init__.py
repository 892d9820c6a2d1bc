"""Python side of the Rust BPE trainer: the compiled core plus the ergonomics around it."""

from tokenizer_rs._tokenizer_rs import version

__all__ = ["version"]
