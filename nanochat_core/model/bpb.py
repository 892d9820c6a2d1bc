"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size.

bpb = Σ nats / (ln 2 · Σ bytes) over the targets, where a target's bytes are `token_bytes[id]`
(its UTF-8 length; 0 for special tokens, which are therefore left out of both sums, as are ignored
targets, id -1). Summed over every rank before dividing, so N processes give one number.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from nanochat_core import dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor, autocast=contextlib.nullcontext) -> float:
    """Bits per byte of `model` over `steps` batches (each rank reads its own)."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        with autocast():
            loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats per target
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    dist.all_reduce_sum(total_nats)
    dist.all_reduce_sum(total_bytes)
    if total_bytes.item() == 0:
        return float("nan")
    return total_nats.item() / (math.log(2) * total_bytes.item())
