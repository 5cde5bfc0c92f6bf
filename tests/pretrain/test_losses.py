"""The pretraining losses against fixtures generated from the anchors' own code (DINOv3's
``dino_clstoken_loss.py``, MAE's ``forward_loss`` with ``norm_pix_loss=True``; regenerate with
``scripts/make_pretrain_fixtures.py``), against hand-computed loops in float64, and their gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from sapiens2.pretrain.dino import (dino_cross_entropy, dino_loss_scales, ema_update, koleo_loss, sinkhorn_knopp,
                                    softmax_center, update_center)
from sapiens2.pretrain.mae import norm_pix_loss, patchify

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "pretrain_parity.safetensors")


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURE)


@pytest.mark.parametrize("case", ["sk", "sk2"])
def test_sinkhorn_matches_dinov3(fx, case):
    out = sinkhorn_knopp(fx[f"{case}.logits"], float(fx[f"{case}.temp"]), int(fx[f"{case}.n_iters"]))
    torch.testing.assert_close(out, fx[f"{case}.out"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sum(1), torch.ones(out.shape[0]))  # each sample's row is a distribution


def test_centering_matches_dinov3(fx):
    out = softmax_center(fx["center.logits"], fx["center.center"], float(fx["center.temp"]))
    torch.testing.assert_close(out, fx["center.out"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["dino", "dino2"])
@pytest.mark.parametrize("nodiag", [False, True])
def test_dino_cross_entropy_and_grad_match_dinov3(fx, case, nodiag):
    s = fx[f"{case}.student"].clone().requires_grad_(True)
    loss = dino_cross_entropy(s, fx[f"{case}.teacher_probs"], float(fx[f"{case}.student_temp"]), ignore_diagonal=nodiag)
    suffix = "_nodiag" if nodiag else ""
    torch.testing.assert_close(loss, fx[f"{case}.loss{suffix}"], rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, fx[f"{case}.grad{suffix}"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["mae", "mae2", "mae3"])
def test_norm_pix_loss_and_grad_match_mae(fx, case):
    pred = fx[f"{case}.pred_image"].clone().requires_grad_(True)
    p = int(fx[f"{case}.patch"])
    loss = norm_pix_loss(fx[f"{case}.imgs"], pred, fx[f"{case}.mask"], p)
    torch.testing.assert_close(loss, fx[f"{case}.loss"], rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(pred.grad, fx[f"{case}.grad_pred_image"], rtol=1e-4, atol=1e-8)
    # our patch order is MAE's (nchpwq -> nhwpqc): patchify of the image layout gives its pred back
    torch.testing.assert_close(patchify(fx[f"{case}.pred_image"], p), fx[f"{case}.pred"])


def _ce_loop(student, teacher_probs, temp, ignore_diagonal, w=None):
    """The docstring's loop, literally, in float64."""
    S, B, _ = student.shape
    T = teacher_probs.shape[0]
    w = torch.ones(B, dtype=torch.float64) if w is None else w.double()
    loss, count = 0.0, 0.0
    for b in range(B):
        for s in range(S):
            for t in range(T):
                if ignore_diagonal and s == t:
                    continue
                logp = torch.log_softmax(student[s, b].double() / temp, -1)
                loss += w[b] * -(teacher_probs[t, b].double() * logp).sum()
                count += w[b]
    return loss / count


@pytest.mark.parametrize("S,T", [(2, 2), (8, 2), (1, 3)])
def test_dino_cross_entropy_equals_the_loop(S, T):
    g = torch.Generator().manual_seed(S * 10 + T)
    s = torch.randn(S, 5, 11, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(T, 5, 11, generator=g, dtype=torch.float64), -1)
    for nodiag in (False, True):
        torch.testing.assert_close(dino_cross_entropy(s, t, 0.1, nodiag).double(), _ce_loop(s, t, 0.1, nodiag),
                                   rtol=1e-6, atol=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(dino_cross_entropy(s, t, 0.1, True, weights=w).double(), _ce_loop(s, t, 0.1, True, w),
                               rtol=1e-6, atol=1e-6)
    # a zero weight is the same as leaving the sample out
    keep = w.bool()
    torch.testing.assert_close(dino_cross_entropy(s, t, 0.1, True, weights=w),
                               dino_cross_entropy(s[:, keep], t[:, keep], 0.1, True))


def test_dino_loss_scales_are_dinov3s():
    assert dino_loss_scales(2, 8, True) == (2 / 18, 16 / 18)
    assert dino_loss_scales(2, 8, False) == (4 / 20, 16 / 20)


def test_norm_pix_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    p = 4
    total, count = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(3):
                if not mask[b, i * 3 + j]:
                    continue
                x = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                y = pred[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                t = (x - x.mean()) / (x.var() + 1e-6).sqrt()  # unbiased variance, as MAE
                total += ((y - t) ** 2).mean()
                count += 1
    torch.testing.assert_close(norm_pix_loss(imgs, pred, mask, p).double(), total / count)
    # masked patches only: changing a visible patch's prediction changes nothing
    pred2 = pred.clone()
    pred2[0, :, 0:4, 4:8] += 100.0  # patch (0, 1) of sample 0 is visible
    assert norm_pix_loss(imgs, pred2, mask, p) == norm_pix_loss(imgs, pred, mask, p)
    with pytest.raises(ValueError, match="pred must have the images' shape"):
        norm_pix_loss(imgs, pred[:, :, :4], mask, p)


def test_ema_is_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    s = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    expect = [0.99 * a + 0.01 * b for a, b in zip(t, s)]
    ema_update(t, s, 0.99)
    for a, e in zip(t, expect):
        torch.testing.assert_close(a, e)
    with pytest.raises(ValueError, match="teacher has 2 tensors, student 1"):
        ema_update(t, s[:1], 0.5)


def test_center_update_is_an_ema_of_the_batch_mean():
    c = torch.zeros(1, 4)
    x = torch.arange(8.0).view(2, 4)
    update_center(c, x, momentum=0.9)
    torch.testing.assert_close(c, 0.1 * x.mean(0, keepdim=True))


def test_sinkhorn_does_not_overflow():
    """Large logits / temp (where exp overflows float32) still give finite targets: the shift by the max
    cancels, so the result is the same as for the logits minus any constant."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, generator=g)
    big = sinkhorn_knopp(x * 5 + 30, 0.04)  # logits / temp up to ~1200: exp overflows without the shift
    assert bool(torch.isfinite(big).all())
    # (the +30 itself costs float32 digits: 750 + x / temp keeps ~5e-5 of x / temp)
    torch.testing.assert_close(big, sinkhorn_knopp(x * 5, 0.04), rtol=1e-3, atol=1e-4)


def test_sinkhorn_balances_prototypes():
    g = torch.Generator().manual_seed(1)
    q = sinkhorn_knopp(torch.randn(64, 8, generator=g) * 0.5, 0.1, n_iters=50)
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8), rtol=1e-3, atol=1e-3)


def test_koleo_hand_computed_and_gradient():
    """Three unit vectors at 0, 90 and 180 degrees (scaled: KoLeo normalises first): every nearest other
    point is 90 degrees away, at distance sqrt(2), so the loss is -log(sqrt(2)); the gradient pushes
    each point away from its nearest neighbour, along the sphere."""
    x = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]], requires_grad=True)
    loss = koleo_loss(x, eps=0.0)
    torch.testing.assert_close(loss, torch.tensor(-0.5 * math.log(2.0)))
    loss.backward()
    # x0's neighbour is x1 (x2 is 180 degrees away): moving x0 towards -y lengthens the distance
    assert x.grad[0, 1] > 0 and abs(float(x.grad[0, 0])) < 1e-6
    # duplicates: the distance is 0, the loss large and finite with eps
    assert torch.isfinite(koleo_loss(torch.ones(4, 3)))
    assert float(koleo_loss(torch.ones(1, 3))) == 0.0  # no neighbour
    with pytest.raises(ValueError, match="features"):
        koleo_loss(torch.ones(3))
