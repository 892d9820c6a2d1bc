"""Muon for the transformer's matrices, AdamW for the embedding and lm_head, and their schedules.

One implementation for one process and for N: `Optimizers.step()` first averages the gradients
across ranks (a few flat all-reduces) when torch.distributed is initialised, then every rank applies
the same deterministic update, so replicas stay bit-identical without a DDP wrapper. Gradient
accumulation therefore needs no `no_sync` bookkeeping: nothing communicates until the step.

Learning rates follow nanochat: embedding 0.2 and unembedding 0.004 (AdamW, betas (0.8, 0.95),
eps 1e-10) scaled by (d_model / 768)^-0.5 so the d20 recipe transfers across widths; matrices 0.02
(Muon) scaled per matrix by sqrt(max(1, rows / cols)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon): they push every singular value into
# roughly [0.7, 1.2] in 5 iterations, which trains as well as an exact orthogonalisation.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
REFERENCE_DIM = 768  # the width at which nanochat's AdamW learning rates were tuned


def orthogonalize(G: Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately U·Vᵀ of G = U·S·Vᵀ by Newton–Schulz; G may be a stack (..., rows, cols)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X·Xᵀ is then the small Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ 1 so the iteration converges
    flat = X.ndim == 2
    if flat:
        X = X.unsqueeze(0)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        # baddbmm fuses the scaled sums into the matmuls: b·A + c·A·A, then a·X + B·X.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if flat:
        X = X.squeeze(0)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose 2-D update is replaced by its nearest orthogonal matrix.

    Matrices of the same shape are orthogonalised as one stacked batch: a transformer has only a
    few distinct shapes, so a step is a handful of batched matmul chains instead of one per matrix.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = NS_STEPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum = group["momentum"]
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                # Stacked bf16 measured 4× faster than one fp32 matrix at a time on the d4-cpu
                # shapes here (AVX-512-BF16 CPU), and bf16 is what Muon uses on GPUs.
                ortho = orthogonalize(torch.stack(updates), group["ns_steps"])
                # Orthogonal updates have unit singular values; tall matrices get a larger step so
                # the per-element RMS of the update matches across shapes.
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-group["lr"] * scale)


def average_gradients(params: list[Tensor]) -> None:
    """All-reduce the gradients of `params` to their mean across ranks, a few flat buffers at a time."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    # Buckets of ~32M elements bound the extra memory while keeping the number of calls small.
    bucket, size, limit = [], 0, 32 * 1024 * 1024
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= limit):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)  # SUM: gloo has no AVG
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket, size = [], 0


class Optimizers:
    """The pair nanochat trains with, stepped, scheduled and checkpointed as one."""

    def __init__(self, model: torch.nn.Module, embedding_lr: float, unembedding_lr: float,
                 matrix_lr: float, weight_decay: float = 0.0):
        d_model = model.config.n_embd
        width_scale = (d_model / REFERENCE_DIM) ** -0.5
        wte = list(model.transformer.wte.parameters())
        lm_head = list(model.lm_head.parameters())
        matrices = list(model.transformer.h.parameters())
        assert len(wte) + len(lm_head) + len(matrices) == len(list(model.parameters())), "a parameter has no optimizer"
        assert all(p.ndim == 2 for p in matrices), "Muon only handles 2-D matrices"
        self.params = wte + lm_head + matrices
        # fused AdamW exists on CUDA and CPU in torch >= 2.4 and saves one kernel launch per tensor.
        self.adamw = torch.optim.AdamW(
            [dict(params=lm_head, lr=unembedding_lr * width_scale), dict(params=wte, lr=embedding_lr * width_scale)],
            betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, fused=True,
        )
        self.muon = Muon(matrices, lr=matrix_lr)
        for opt in (self.adamw, self.muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]

    def set_schedule(self, lr_mult: float, muon_momentum: float) -> None:
        for opt in (self.adamw, self.muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self, grad_clip: float = 0.0) -> float | None:
        """Average gradients across ranks, clip their global norm if asked, update; returns the norm."""
        average_gradients(self.params)
        norm = None
        if grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, grad_clip))
        self.adamw.step()
        self.muon.step()
        return norm

    def zero_grad(self) -> None:
        for opt in (self.adamw, self.muon):
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


# --- schedules: plain functions of the step ---------------------------------------------------


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0,
                  warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` at the last step.

    `step` counts optimizer steps from 0; the multiplier applies to the update made at that step.
    """
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, ramp_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum ramps linearly from 0.85 to 0.95 over the first 300 steps (nanochat)."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end
