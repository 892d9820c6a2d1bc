"""Muon + AdamW and their schedules."""

import copy

import pytest
import torch

from nanochat_core.model.gpt import GPTConfig, build_model
from nanochat_core.model.optim import Muon, Optimizers, lr_multiplier, muon_momentum, orthogonalize


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32)])
def test_newton_schulz_pushes_singular_values_towards_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k))
    G = U @ torch.diag(torch.logspace(-1, 1, k)) @ V.T  # condition number 100, on purpose
    X = orthogonalize(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.5 and s.max() < 1.3, s
    # Same singular vectors: the result is aligned with G's polar factor.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X.float() * polar).sum() / (X.float().norm() * polar.norm())
    assert cos > 0.95


def test_muon_scales_tall_matrices():
    torch.manual_seed(0)
    wide = torch.nn.Parameter(torch.zeros(16, 64))
    tall = torch.nn.Parameter(torch.zeros(64, 16))
    opt = Muon([wide, tall], lr=0.1, momentum=0.0, nesterov=False)
    wide.grad, tall.grad = torch.randn(16, 64), torch.randn(64, 16)
    opt.step()
    # Orthogonal update entries have RMS 1/sqrt(max dim) ... times sqrt(rows/cols) for the tall one.
    rms_wide, rms_tall = wide.data.pow(2).mean().sqrt(), tall.data.pow(2).mean().sqrt()
    torch.testing.assert_close(rms_tall / rms_wide, torch.tensor(2.0), rtol=0.1, atol=0)


def test_lr_schedule_shape():
    N = 100
    mults = [lr_multiplier(s, N, warmup_ratio=0.0, warmdown_ratio=0.2) for s in range(N)]
    assert mults[0] == 1.0 and mults[80] == 1.0
    assert all(a >= b for a, b in zip(mults[80:], mults[81:]))
    assert mults[-1] == pytest.approx(1 / 20)  # the last step of a 20-step linear ramp to 0
    assert lr_multiplier(N, N) == 0.0
    assert lr_multiplier(N, N, final_lr_frac=0.1) == pytest.approx(0.1)
    warm = [lr_multiplier(s, N, warmup_ratio=0.1) for s in range(10)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == 1.0


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(10_000) == pytest.approx(0.95)


def test_every_parameter_has_exactly_one_optimizer_and_lrs_scale_with_width():
    model = build_model(GPTConfig.from_depth(2, 100, 16, aspect_ratio=96, head_dim=32))  # d_model 192
    opt = Optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    ids = [id(p) for o in (opt.adamw, opt.muon) for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    lrs = sorted(g["lr"] for g in opt.adamw.param_groups)
    assert lrs == pytest.approx([0.004 * 2, 0.2 * 2])  # (192/768)^-0.5 = 2
    opt.set_schedule(0.5, 0.9)
    assert sorted(g["lr"] for g in opt.adamw.param_groups) == pytest.approx([0.004, 0.2])
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.muon.param_groups[0]["momentum"] == 0.9


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, 100, 16, aspect_ratio=32, head_dim=16))
    opt = Optimizers(model, 0.2, 0.004, 0.02)
    data = torch.randint(0, 100, (2, 17))

    def step(m, o):
        m(data[:, :-1], data[:, 1:]).backward()
        o.step(grad_clip=1.0)
        o.zero_grad()

    for _ in range(3):
        step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = Optimizers(twin, 0.2, 0.004, 0.02)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(model, opt)
        step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
