"""The GPT: shapes, learning, KV-cache decoding against the full forward pass, parameter counts."""

import pytest
import torch

from nanochat_core.config import BaseTrainConfig, PlanConfig
from nanochat_core.errors import UserError
from nanochat_core.model.gpt import GPTConfig, KVCache, build_model
from nanochat_core.model.optim import Optimizers
from nanochat_core.plan import make_plan


def tiny_config(kv_head_ratio: int = 1, vocab: int = 100) -> GPTConfig:
    return GPTConfig.from_depth(2, vocab, 32, aspect_ratio=32, head_dim=16, kv_head_ratio=kv_head_ratio)


def test_forward_shapes_and_padded_vocab():
    cfg = tiny_config()
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, cfg.vocab_size)  # padding columns are cut off
    assert model.lm_head.weight.shape[0] == cfg.padded_vocab_size == 128
    assert logits.abs().max() <= 15.0  # the softcap bounds every logit
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (3 * 17,)
    torch.testing.assert_close(per_token.mean(), loss)


def test_ignored_targets_do_not_count():
    model = build_model(tiny_config())
    idx = torch.randint(0, 100, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    full = model(idx[:, :4], idx[:, :4])
    masked = model(idx, targets)
    # Causal attention: the first four positions see the same context in both calls.
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)


def test_initialisation_makes_blocks_identity_and_embeddings_unit():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, 1000, 32, aspect_ratio=64, head_dim=32))
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert 0.9 < model.transformer.wte.weight.std().item() < 1.1
    assert model.lm_head.weight.std().item() < 0.01


def test_loss_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    opt = Optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    idx = torch.randint(0, 100, (4, 33))
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kv_head_ratio", [1, 2])
def test_kv_cache_decoding_equals_full_forward(kv_head_ratio):
    torch.manual_seed(0)
    cfg = tiny_config(kv_head_ratio)
    assert cfg.n_kv_head == cfg.n_head // kv_head_ratio
    model = build_model(cfg)
    # Train a few steps so the output projections are no longer zero and attention matters.
    opt = Optimizers(model, 0.2, 0.004, 0.02)
    data = torch.randint(0, 100, (4, 33))
    for _ in range(5):
        model(data[:, :-1], data[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = [5, 17, 42, 8, 99, 3]
    cached = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    # Reference: greedy decoding that re-runs the whole sequence every token, no cache.
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]
    # And the logits themselves agree position by position.
    with torch.no_grad():
        full = model(torch.tensor([seq]))
        cache = KVCache(1, cfg.n_kv_head, len(seq), cfg.head_dim, cfg.n_layer)
        first = model(torch.tensor([seq[:4]]), kv_cache=cache)
        chunk = model(torch.tensor([seq[4:9]]), kv_cache=cache)  # a multi-token chunk after a prefix
        steps = [model(torch.tensor([[t]]), kv_cache=cache) for t in seq[9:]]
    stitched = torch.cat([first, chunk, *steps], dim=1)
    torch.testing.assert_close(stitched, full, rtol=1e-4, atol=1e-4)


def test_kv_cache_overflow_is_a_user_error():
    cfg = tiny_config()
    model = build_model(cfg)
    cache = KVCache(1, cfg.n_kv_head, 4, cfg.head_dim, cfg.n_layer)
    with pytest.raises(UserError, match="KV cache"):
        model(torch.randint(0, 100, (1, 5)), kv_cache=cache)


def test_plan_parameter_count_is_the_instantiated_models():
    train = BaseTrainConfig(depth=3, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=2,
                            total_batch_size=256, num_iterations=1)
    plan = make_plan(train, 1000, 1, PlanConfig(gpu="cpu"))
    model = build_model(GPTConfig.from_depth(3, 1000, 64, aspect_ratio=32, head_dim=32))
    assert plan.num_params == sum(p.numel() for p in model.parameters())
    assert plan.flops_per_token == model.estimate_flops()


def test_d20_has_561m_parameters():
    model = build_model(GPTConfig.from_depth(20, 65536, 2048), device="meta")
    assert model.config.n_embd == 1280 and model.config.n_head == 10
    assert 560e6 < model.num_params() < 562e6


@pytest.mark.parametrize("T,groups", [(5, 1), (128, 1), (300, 2)])  # one block, exact blocks, ragged + GQA
def test_cpu_block_attention_equals_sdpa(T, groups):
    from nanochat_core.model.gpt import causal_attention_cpu

    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 16, requires_grad=True)
    k, v = (torch.randn(2, 4 // groups, T, 16, requires_grad=True) for _ in range(2))
    got = causal_attention_cpu(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
