"""A tiny servable checkpoint built in-process: a real BPE tokenizer and a random-init GPT saved with the
checkpoint module under <base>/base_checkpoints/d2, as `nanochat base-train` would leave it.
Used by tests/test_serve*.py, tests/test_chat_cli.py and bench/serve_load.py."""

from __future__ import annotations

import functools
import inspect

from nanochat_core.paths import join

# Real prose plus the non-ASCII text UTF-8 streaming must get right (accents, CJK, emoji).
EXTRA = ["café naïve résumé — “quotes” ü ß", "日本語のテキストと中文字符", "emoji 🙂🚀🎉 and ∑ ∫ √ π ≤ ≥"] * 20


@functools.cache
def _texts() -> tuple[str, ...]:
    import argparse, collections, json, pathlib, re, string  # noqa: E401  (their docstrings are the corpus)

    docs = []
    for mod in (argparse, collections, json, pathlib, re, string):
        for obj in [mod] + [getattr(mod, a) for a in dir(mod) if not a.startswith("_")]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 100:
                docs.append(doc)
    return tuple(dict.fromkeys(docs)) + tuple(EXTRA)


@functools.cache
def tiny_tokenizer(vocab_size: int = 512):
    from nanochat_core.tokenizer import Tokenizer

    return Tokenizer.train(list(_texts()), vocab_size)


def make_tiny_checkpoint(base: str, seq_len: int = 128, depth: int = 2, dim: int = 64, step: int = 0,
                         family: str = "base_checkpoints", seed: int = 0) -> str:
    """Write tokenizer + a random-init model checkpoint into `base`; returns the checkpoint directory."""
    import torch

    from nanochat_core.checkpoint import save_checkpoint
    from nanochat_core.model.gpt import GPTConfig, build_model

    tok = tiny_tokenizer()
    tok_dir = join(base, "tokenizer")
    tok.save(tok_dir)
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=depth, n_head=dim // 32,
                    n_kv_head=dim // 32, n_embd=dim)
    model = build_model(cfg, "cpu")
    with torch.no_grad():  # random output projections: the zero init would make every token equally likely
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
        model.lm_head.weight.normal_(std=0.5)
    ckpt = join(base, family, f"d{depth}")
    meta = {"step": step, "model_config": cfg.to_dict(), "tokenizer_dir": tok_dir}
    save_checkpoint(ckpt, step, 0, model.state_dict(), {}, meta)
    return ckpt


def scripted_model(tokenizer, *chains: list[int], dim: int = 64):
    """A real GPT whose greedy output is scripted: within each chain, token c[i] is always followed by c[i+1].

    With zero output projections (the model's own init) every block is the identity, so the logits see
    only the current token: one-hot embeddings plus an lm_head row per successor make a bigram table.
    This drives the real engine through a tool call without training a model.
    """
    import torch

    from nanochat_core.model.gpt import GPTConfig, build_model

    pairs = [(a, b) for c in chains for a, b in zip(c, c[1:])]
    assert len({a for a, _ in pairs}) == len(pairs) <= dim, "each token needs one successor and a dimension"
    cfg = GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=dim)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(pairs):
            model.transformer.wte.weight[token, i] = 1.0
            model.lm_head.weight[successor, i] = 10.0
    return model.eval()
