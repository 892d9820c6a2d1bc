"""Pretraining data: shards on disk or object stores, and the tokenizing loader."""
