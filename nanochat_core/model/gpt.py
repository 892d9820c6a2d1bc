"""The GPT: nanochat's seed-era architecture (d20 = 561M parameters at vocab 65,536).

- rotary position embeddings, no learned positions
- QK-norm (after rotary), parameter-free RMSNorm, pre-norm blocks, a norm after the token embedding
- no biases anywhere; ReLU² MLP at 4× width
- untied token embedding and lm_head; vocab padded to a multiple of 64; logit softcap 15·tanh(x/15)
- grouped-query attention through n_kv_head
The plan counts parameters by instantiating this module on the meta device, so d32 costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.errors import UserError
from nanochat_core.model.loss import softcap_cross_entropy

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10_000  # seed-era; HEAD uses 100,000


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the lm_head matmul on fast tensor-core shapes.
        return -(-self.vocab_size // 64) * 64

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int,
        sequence_len: int,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        kv_head_ratio: int = 1,
    ) -> "GPTConfig":
        """nanochat's one dial: model_dim = depth·aspect_ratio, heads = ceil(model_dim / head_dim)."""
        if depth < 1:
            raise UserError(f"depth {depth} is not a positive number of layers; pass --depth 1 or more")
        model_dim = depth * aspect_ratio
        n_head = max(1, -(-model_dim // head_dim))
        if model_dim % n_head:
            raise UserError(
                f"model_dim {model_dim} (depth {depth} × aspect ratio {aspect_ratio}) does not split "
                f"into {n_head} heads; pick --aspect-ratio or --head-dim so that it divides"
            )
        if n_head % kv_head_ratio:
            raise UserError(
                f"{n_head} heads do not split into groups of --kv-head-ratio {kv_head_ratio}; "
                f"pick a ratio that divides {n_head}"
            )
        return cls(sequence_len, vocab_size, depth, n_head, n_head // kv_head_ratio, model_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class KVCache:
    """Keys and values of every layer, (n_layer, 2, B, H_kv, T_max, D), filled as decoding advances."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.cache: torch.Tensor | None = None
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, other: "KVCache") -> None:
        """Copy a batch-1 prefill into every row of this (larger-batch) cache."""
        assert self.cache is None and other.cache is not None
        self.cache = other.cache.new_empty(self.shape)
        self.cache[:, :, :, :, : other.pos] = other.cache[:, :, :, :, : other.pos]
        self.pos = other.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.cache is None:
            self.cache = k.new_empty(self.shape)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.cache.size(4):
            raise UserError(
                f"the conversation needs {t1} tokens but the KV cache holds {self.cache.size(4)}; "
                "shorten the history or raise the cache length"
            )
        self.cache[layer_idx, 0, :, :, t0:t1] = k
        self.cache[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.cache.size(0) - 1:
            self.pos = t1  # the last layer advances the position for the whole model
        return self.cache[layer_idx, 0, :, :, :t1], self.cache[layer_idx, 1, :, :, :t1]


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Causal attention of (B, H, T, D) heads as matmuls over blocks of queries, skipping the keys
    above each block's diagonal; the softmax in fp32.

    PyTorch's CPU flash-attention kernel ran d4-cpu's bf16 heads (8, 2, 512, 64) at ~65 GFLOP/s
    where a plain bmm reaches ~400 on this project's 2-core machine: forward+backward of one layer
    took 29 ms against 16 ms here (compiled, measured interleaved), in blocks of 128 queries that
    skip 3/8 of the scores. In fp32 the two are within 10%. CUDA keeps SDPA's flash kernels.
    """
    T, scale = q.size(2), q.size(-1) ** -0.5
    if k.size(1) != q.size(1):  # grouped-query attention: each kv head serves its group of queries
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)).float() * scale
        visible = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(v.dtype)
        out.append(probs @ v[:, :, :end])
    return torch.cat(out, dim=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache: KVCache | None):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if Tq == Tk and q.device.type == "cpu":
            y = causal_attention_cpu(q, k, v)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # A chunk after a cached prefix: the prefix is fully visible, the chunk is causal.
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rotary tables for 10× the training length so generation can run past it; not parameters.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, device=None):
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROTARY_BASE ** (channels / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's HEAD init: embedding N(0,1), lm_head N(0,0.001), input matrices
        uniform ±√3/√d (std 1/√d), output projections zero, so every block starts as identity."""
        if self.cos.device.type == "meta":
            return
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0) / math.sqrt(self.config.n_embd)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.rotary_seq_len, self.config.head_dim, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """FLOPs per token of a forward+backward: 6·(params − wte) + 12·l·h·q·t (attention)."""
        c = self.config
        dense = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * dense + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction="mean"):
        B, T = idx.size()
        t0 = kv_cache.get_pos() if kv_cache is not None else 0
        if t0 + T > self.rotary_seq_len:
            raise UserError(
                f"sequence of {t0 + T} tokens exceeds the rotary table ({self.rotary_seq_len}); "
                "shorten the input"
            )
        dtype = self.transformer.wte.weight.dtype
        cos_sin = self.cos[:, t0 : t0 + T].to(dtype), self.sin[:, t0 : t0 + T].to(dtype)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        if targets is not None and loss_reduction != "none" and torch.is_grad_enabled():
            # Training: the fused chunked loss never materialises the logits (model/loss.py).
            return softcap_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size,
                                         LOGIT_SOFTCAP, loss_reduction)
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            # Only slice when there is padding: the slice's backward allocates and fills a zero
            # tensor the size of all logits, which measured ~5% of a d4-cpu step on CPU.
            logits = logits[..., : self.config.vocab_size]
        logits = logits.float()  # (B, T, V); the softcap and the loss in fp32
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Yield token ids one at a time after `tokens`, decoding with a KV cache."""
        device = self.transformer.wte.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        c = self.config
        cache = KVCache(1, c.n_kv_head, len(tokens) + max_tokens, c.head_dim, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=cache)[:, -1, :]
            next_id = sample_next(logits, rng, temperature, top_k)
            ids = next_id
            yield int(next_id.item())


def sample_next(logits: torch.Tensor, rng: torch.Generator, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: argmax at temperature 0, else softmax over the top k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return idx.gather(1, torch.multinomial(probs, 1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)


def build_model(config: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    """Create on the meta device, move to `device`, then initialise: no double allocation."""
    with torch.device("meta"):
        model = GPT(config)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights()
    return model
