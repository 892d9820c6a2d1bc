"""The training loss: lm_head, logit softcap and cross-entropy over chunks of rows, gradients in the forward.

The plain path (`GPT.forward` without gradients) materialises all (B·T, V) logits in fp32 and
walks them about ten times, forward and backward (cast, softcap, log-softmax and their
backwards); at d4-cpu's shape that is 134 MB per walk and was half of a training step on CPU.
Here each chunk of rows goes matmul → softcap → softmax → gradient while it is still in cache,
and the gradients of the hidden states and of lm_head are finished right there, so the backward
pass only scales them by the incoming gradient. The math is F.cross_entropy(softcap(x·Wᵀ)) over
the targets ≠ -1, summed or averaged; under autocast the three matmuls run in bf16 like the plain
path's, and the softcap and softmax run in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Logit elements per chunk: ~8 MB of fp32 on CPU stays in cache across the walks over it; on
# CUDA, chunks large enough that launches do not matter (d20's 65,536-row step: 32 chunks).
CHUNK_ELEMENTS = {"cpu": 1 << 21}
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def _loss_and_grad(logits: Tensor, targets: Tensor, scale: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """One chunk: the summed loss over its valid targets and d(scale·loss)/d(logits), in the logits' dtype."""
    z = logits.float()
    # cap·tanh(z/cap) through one exp: tanh costs about three exps on CPU. exp overflowing to inf
    # for huge z still gives exactly +cap.
    capped = cap - (2 * cap) / (torch.exp(z * (2 / cap)) + 1)
    # |capped| ≤ cap, so exp cannot overflow and the softmax needs no max pass.
    e = torch.exp(capped)
    total = e.sum(-1, keepdim=True)
    valid = targets >= 0
    safe = targets.clamp(min=0)
    target_logit = capped.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, torch.log(total.squeeze(1)) - target_logit, 0.0).sum()
    onehot = torch.arange(z.size(1), device=z.device)[None, :] == safe[:, None]
    # d loss / d capped = softmax − onehot; d capped / d z = 1 − tanh² = 1 − (capped/cap)².
    grad = (e / total - onehot.float()) * (1 - (capped / cap) ** 2) * (valid[:, None].float() * scale)
    return loss, grad.to(logits.dtype)


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, cap: float, mean: bool):
        x = hidden.reshape(-1, hidden.size(-1))
        targets = targets.reshape(-1)
        w = weight[:vocab_size]  # padding rows never get a logit, nor a gradient
        count = (targets >= 0).sum()
        scale = 1.0 / count.clamp(min=1).float() if mean else torch.ones((), device=x.device)
        rows = max(1, CHUNK_ELEMENTS.get(x.device.type, DEFAULT_CHUNK_ELEMENTS) // vocab_size)
        grad_x = torch.empty(x.shape, dtype=hidden.dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), rows):
            xc = x[start : start + rows]
            chunk_loss, grad = _loss_and_grad(xc @ w.T, targets[start : start + rows], scale, cap)
            loss += chunk_loss
            grad_x[start : start + rows] = grad @ w
            grad_w[:vocab_size] += (grad.T @ xc).float()
        ctx.save_for_backward(grad_x.view(hidden.shape), grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None


def softcap_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, cap: float,
                          reduction: str = "mean") -> Tensor:
    """cross_entropy(cap·tanh(hidden·weightᵀ / cap)[..., :vocab_size], targets, ignore_index=-1).

    `reduction` is "mean" or "sum"; a batch whose targets are all -1 has loss 0 (not NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"softcap_cross_entropy reduces by mean or sum, not {reduction!r}")
    return _SoftcapCrossEntropy.apply(hidden, weight, targets, vocab_size, cap, reduction == "mean")
