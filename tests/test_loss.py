"""The fused training loss against the plain path: values and gradients, chunked, masked, padded."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanochat_core.model import loss as fused_loss
from nanochat_core.model.gpt import LOGIT_SOFTCAP
from nanochat_core.model.loss import softcap_cross_entropy

VOCAB, PADDED, DIM = 300, 320, 24  # a padded vocabulary, like GPTConfig.padded_vocab_size


def plain(hidden, weight, targets, reduction):
    logits = (hidden @ weight.T)[..., :VOCAB].float()
    logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1, reduction=reduction)


def loss_and_grads(fn, hidden, weight, targets, reduction, autocast):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        loss = fn(h, w, targets, reduction)
    (3.0 * loss).backward()  # a non-unit incoming gradient, as grad accumulation gives
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk_rows", [4, 7, 1000])  # several chunks, a ragged last one, one chunk
def test_fused_loss_equals_softcapped_cross_entropy(monkeypatch, reduction, autocast, chunk_rows):
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", chunk_rows * VOCAB)
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, DIM)
    weight = torch.randn(PADDED, DIM) * 2  # large logits, so the softcap bends them
    targets = torch.randint(0, VOCAB, (3, 10))
    targets[0, :4] = -1
    fused = loss_and_grads(lambda h, w, t, r: softcap_cross_entropy(h, w, t, VOCAB, LOGIT_SOFTCAP, r),
                           hidden, weight, targets, reduction, autocast)
    ref = loss_and_grads(plain, hidden, weight, targets, reduction, autocast)
    for got, want in zip(fused, ref):
        if autocast:  # both round through bf16, at different points: compare as a whole
            assert (got - want).norm() <= 1e-2 * want.norm()
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(fused[2][VOCAB:]) == 0  # padding rows of lm_head get no gradient


def test_all_targets_ignored_is_zero_loss_not_nan():
    hidden = torch.randn(2, 5, DIM, requires_grad=True)
    weight = torch.randn(PADDED, DIM, requires_grad=True)
    loss = softcap_cross_entropy(hidden, weight, torch.full((2, 5), -1), VOCAB, LOGIT_SOFTCAP)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_huge_logits_stay_finite():
    # exp(2z/cap) overflows to inf for z ≳ 660: the softcap must still give exactly ±cap, not NaN.
    hidden = torch.tensor([[[1000.0, -1000.0]]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    loss = softcap_cross_entropy(hidden, weight, torch.tensor([[1]]), 3, LOGIT_SOFTCAP)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(loss, plain_3(hidden.detach(), weight.detach()))


def plain_3(hidden, weight):
    logits = LOGIT_SOFTCAP * torch.tanh((hidden @ weight.T).float() / LOGIT_SOFTCAP)
    return F.cross_entropy(logits.reshape(-1, 3), torch.tensor([1]))


def test_training_forward_uses_the_fused_loss_and_matches_eval():
    from nanochat_core.model.gpt import GPTConfig, build_model

    model = build_model(GPTConfig.from_depth(2, VOCAB, 16, aspect_ratio=32, head_dim=16))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    idx = torch.randint(0, VOCAB, (2, 17))
    train_loss = model(idx[:, :-1], idx[:, 1:])  # gradients on: the fused path
    assert train_loss.grad_fn is not None and "SoftcapCrossEntropy" in type(train_loss.grad_fn).__name__
    with torch.no_grad():
        eval_loss = model(idx[:, :-1], idx[:, 1:])  # the plain path
    torch.testing.assert_close(train_loss.detach(), eval_loss, rtol=1e-5, atol=1e-5)
