"""A tiny servable checkpoint built in-process: a real BPE tokenizer and a random-init GPT saved with the
checkpoint module under <base>/base_checkpoints/d2, as `nanochat base-train` would leave it.
Used by tests/test_serve*.py, tests/test_chat_cli.py and bench/serve_load.py; `serve_process` runs the real
server on loopback for the tests that drive it as a client would."""

from __future__ import annotations

import contextlib
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


def tiny_gpt(vocab_size: int, seq_len: int = 128, depth: int = 2, dim: int = 64, n_kv_head: int | None = None,
             seed: int = 0):
    """A random-init GPT in fp32 on CPU whose blocks matter: heads of 32 dims, `n_kv_head` < heads for GQA."""
    import torch

    from nanochat_core.model.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=dim // 32,
                    n_kv_head=n_kv_head or dim // 32, n_embd=dim)
    model = build_model(cfg, "cpu")
    with torch.no_grad():  # random output projections: the zero init would make every token equally likely
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
        model.lm_head.weight.normal_(std=0.5)
    return model.eval()


def make_tiny_checkpoint(base: str, seq_len: int = 128, depth: int = 2, dim: int = 64, step: int = 0,
                         family: str = "base_checkpoints", seed: int = 0) -> str:
    """Write tokenizer + a random-init model checkpoint into `base`; returns the checkpoint directory."""
    from nanochat_core.checkpoint import save_checkpoint

    tok = tiny_tokenizer()
    tok_dir = join(base, "tokenizer")
    tok.save(tok_dir)
    model = tiny_gpt(tok.vocab_size, seq_len, depth, dim, seed=seed)
    ckpt = join(base, family, f"d{depth}")
    meta = {"step": step, "model_config": model.config.to_dict(), "tokenizer_dir": tok_dir}
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


@contextlib.contextmanager
def serve_process(base: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
    """`nanochat serve` on 127.0.0.1 in a subprocess over the checkpoints in `base`; yields (url, proc, log
    path). Stopped by its PID at the end: SIGTERM, then SIGKILL if it has not exited in 20 s."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path = join(base, "server.log")
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nanochat_core.cli", "serve", "--port", str(port), *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"nanochat serve exited with {proc.returncode}:\n{log.read()}")
                try:
                    if httpx.get(url + "/health", timeout=2).json()["ready"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"nanochat serve did not become ready in {timeout:.0f} s")
                time.sleep(0.3)
            yield url, proc, log_path
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)
