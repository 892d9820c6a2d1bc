"""Small shared fixtures for the post-training tests: a tokenizer trained in-process and a tiny GPT."""

from __future__ import annotations

import functools

import pytest

TEXT = ("The quick brown fox jumps over the lazy dog. How many r are in strawberry? 16-3-4 = 9 eggs. "
        "Hello, I am nanochat! Multiple Choice question: - A - B - C - D. #### 18\n") * 20


@functools.lru_cache(maxsize=1)
def tokenizer():
    from nanochat_core.tokenizer import Tokenizer

    return Tokenizer.train([TEXT], vocab_size=400)


def tiny_model(vocab_size: int, seed: int = 0, seq_len: int = 128):
    import torch

    from nanochat_core.model.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    model = build_model(GPTConfig.from_depth(2, vocab_size, seq_len, aspect_ratio=32, head_dim=32), "cpu")
    # The init zeroes output projections; random ones make the blocks matter in the comparisons.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread for these tiny models: on the shared 2-core machine, two OpenMP threads
    contending with other processes' load measured ~50x slower per forward pass than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
