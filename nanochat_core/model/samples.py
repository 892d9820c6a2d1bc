"""Greedy samples of a base model: the prompts nanochat prints during and after pretraining.

    texts = greedy_samples(model, tokenizer, max_tokens=16)   # one completion per SAMPLE_PROMPTS entry

Read by eye, not scored: they show a run learning facts (France -> Paris) long before CORE moves.
"""

from __future__ import annotations

import contextlib

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


def greedy_samples(model, tokenizer, max_tokens: int, autocast=contextlib.nullcontext) -> list[str]:
    """Each prompt (after BOS, as training documents start) continued at temperature 0."""
    texts = []
    with autocast():
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
            new = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
            texts.append(tokenizer.decode(ids[1:] + new))
    return texts
