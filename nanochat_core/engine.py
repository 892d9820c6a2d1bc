"""Inference: batched sampling with a KV cache and the calculator tool, for chat, eval and RL.

    engine = Engine(model, tokenizer)
    prompt = render_for_completion(tokenizer, conversation)
    sequences, masks = engine.generate_batch(prompt, num_samples=16, max_tokens=256, temperature=1.0, top_k=50)
    for column, forced in engine.generate(prompt, max_tokens=64, temperature=0.0): ...   # streaming

The prompt is prefilled once at batch size 1 and its cache copied into every sample's row, so k
samples cost one prompt pass. Each row stops at `<|assistant_end|>` or `<|bos|>`. Tool use is a small
state machine per row: tokens between `<|python_start|>` and `<|python_end|>` are collected, run by
the tool (the sandboxed calculator, nanochat_core.sandbox.calculate) and the result is forced in as
`<|output_start|>result<|output_end|>`; forced tokens carry mask 0 (RL must not learn from them).
A failing tool call yields an `error: ...` string, which is forced in like any result.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from nanochat_core.errors import UserError
from nanochat_core.model.gpt import KVCache, sample_next


@dataclass
class RowState:
    """Per-sample decoding state."""

    forced: deque = field(default_factory=deque)  # tokens the tool output forces next
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, tool: Callable[[str], str] | None = "calculator"):
        """`tool`: called with the python block's text, returns the output text; None disables tools."""
        from nanochat_core.sandbox import calculate

        self.model, self.tokenizer = model, tokenizer
        self.tool = calculate if tool == "calculator" else tool
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.bos_token_id}

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, step by step, one token per sample and its mask (1 sampled, 0 forced by the tool).

        A finished row keeps yielding its stop token; callers (generate_batch) ignore what follows it.
        """
        if not tokens:
            raise UserError("generation needs a non-empty prompt; render the conversation first")
        c = self.model.config
        limit = self.model.rotary_seq_len
        max_tokens = max_tokens if max_tokens is not None else max(1, c.sequence_len - len(tokens))
        if len(tokens) + max_tokens > limit:
            raise UserError(f"prompt ({len(tokens)} tokens) + {max_tokens} new tokens exceed the model's "
                            f"{limit}-token window; shorten the conversation or ask for fewer tokens")
        rng = torch.Generator(device=self.device).manual_seed(seed)
        total = len(tokens) + max_tokens
        prefill = KVCache(1, c.n_kv_head, total, c.head_dim, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=prefill)[:, -1, :]
        cache = KVCache(num_samples, c.n_kv_head, total, c.head_dim, c.n_layer)
        cache.prefill(prefill)
        del prefill
        logits = logits.expand(num_samples, -1)
        rows = [RowState() for _ in range(num_samples)]
        for _ in range(max_tokens):
            sampled = sample_next(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                if row.done:
                    column.append(next(iter(self.stop_ids)) if token not in self.stop_ids else token)
                    masks.append(0)
                    continue
                if row.forced:
                    token, mask = row.forced.popleft(), 0
                else:
                    mask = 1
                self._advance(row, token)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if all(r.done for r in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=self.device)[:, None]
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def _advance(self, row: RowState, token: int) -> None:
        if token in self.stop_ids:
            row.done = True
        elif self.tool is None:
            return
        elif token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = self.tool(self.tokenizer.decode(row.python_tokens))
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks): each sample's prompt + completion (stop token excluded) and its mask
        (0 on the prompt and on forced tool output)."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if finished[i]:
                    continue
                if token in self.stop_ids:
                    finished[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(mask)
            if all(finished):
                break
        return sequences, masks

    def complete(self, tokens: list[int], **kwargs) -> str:
        """The decoded text of one sample after `tokens`."""
        sequences, _ = self.generate_batch(tokens, 1, **kwargs)
        return self.tokenizer.decode(sequences[0][len(tokens):])
