"""Albedo loss: per-pixel L1 (or L2) + gradient matching + chromaticity L1 (+ optional mean alignment).

Inputs: ``pred``, ``target`` ``(B, 3, H, W)`` albedo in [0, 1] sRGB, ``valid_mask`` ``(B, 1, H, W)``
(bool or 0/1; default ``target[:, 0] > -100``: every pixel, except ones marked -100 or below or NaN). ``m`` is the
mask as float, ``N = max(sum m, 1)`` the number of valid pixels; sums run over ``b, c, h, w``.

Terms and default weights (the official albedo config: ``L1Loss(loss_weight=2)``,
``AlbedoGradL1Loss(loss_weight=2)``, ``AlbedoChromaticityL1Loss(loss_weight=1)``)::

    loss_l1        = 2 * sum m * |pred - target| / N               (pixel="l2": squared, key loss_l2)
    loss_grad_l1   = 2 * (Lx + Ly) / 2                             (Lx, Ly: masked MSE of forward
                                                                    differences, as in normal.py)
    loss_chroma_l1 = 1 * sum m * |chr(clamp(pred, 0, 1)) - chr(target)| / N,
                     chr(x) = x / (x_R + x_G + x_B + 1e-6)         (brightness-invariant colour)
    loss_mean      = w_mean * mean_b sum_c (mu_c(pred) - mu_c(target))^2,   mu_c(x) = sum_hw m x_c / max(sum_hw m, 1)

Paper vs config: the paper summary lists L2, gradient and a spatial RGB mean-alignment loss
``||mu(A_hat) - mu(A)||^2``; the released config uses L1 + gradient + chromaticity and has no mean
term. The default is the config (``mean_weight=0``, the term is then not computed);
``build_loss("albedo", preset="paper")`` gives ``pixel="l2"``, ``chroma_weight=0``, ``mean_weight=1``
(the paper gives no weights: 2, 2 and 1 are our choice). ``mu`` above is our reading of the paper's
``mu``: the per-sample, per-channel mean over valid pixels.

Bad input: differing shapes, a channel count other than 3 and NaN targets inside the valid region
raise ``ValueError`` (NaN targets outside it are ignored; the official would return 0 for the term).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._common import (
    acc_dtype,
    check_float,
    check_pixel,
    check_same_shape,
    clean_target,
    grad_mse,
    masked_pixel_mean,
    pixel_error,
    total,
    valid_mask_of,
)


class AlbedoLoss(nn.Module):
    """L1/L2 + gradient + chromaticity (+ mean alignment). Returns ``{"loss_l1", "loss_grad_l1", "loss_chroma_l1", "loss"}``."""

    def __init__(
        self,
        pixel_weight: float = 2.0,
        grad_weight: float = 2.0,
        chroma_weight: float = 1.0,
        mean_weight: float = 0.0,
        pixel: str = "l1",
        chroma_eps: float = 1e-6,
        invalid_value: float = -100.0,
        check_inputs: bool = True,
    ):
        super().__init__()
        self.pixel_weight = float(pixel_weight)
        self.grad_weight = float(grad_weight)
        self.chroma_weight = float(chroma_weight)
        self.mean_weight = float(mean_weight)
        self.pixel = check_pixel(pixel)
        self.chroma_eps = chroma_eps
        self.invalid_value = invalid_value
        self.check_inputs = check_inputs

    def forward(self, pred: Tensor, target: Tensor, valid_mask: Optional[Tensor] = None) -> dict:
        check_float("pred", pred, 4, "(B, 3, H, W) albedo")
        check_float("target", target, 4, "(B, 3, H, W) albedo")
        check_same_shape("pred", pred, "target", target)
        if pred.shape[1] != 3:
            raise ValueError(f"pred must have 3 channels (RGB albedo), got shape {tuple(pred.shape)}")
        acc = acc_dtype(pred)
        valid = valid_mask_of(valid_mask, target, self.invalid_value, self.check_inputs)
        t = clean_target("target", target.to(acc), valid, self.check_inputs)
        p = pred.to(acc)
        m = valid.to(acc)

        terms = {}
        if self.pixel_weight:
            terms[f"loss_{self.pixel}"] = self.pixel_weight * masked_pixel_mean(pixel_error(p, t, self.pixel), m)
        if self.grad_weight:
            lx, ly = grad_mse(p, t, m)
            terms["loss_grad_l1"] = self.grad_weight * 0.5 * (lx + ly)
        if self.chroma_weight:
            pc = p.clamp(0, 1)
            pc = pc / (pc.sum(1, keepdim=True) + self.chroma_eps)
            tc = t / (t.sum(1, keepdim=True) + self.chroma_eps)
            terms["loss_chroma_l1"] = self.chroma_weight * masked_pixel_mean((pc - tc).abs(), m)
        if self.mean_weight:
            n = m.sum((2, 3)).clamp(min=1)  # (B, 1)
            mu_p, mu_t = (p * m).sum((2, 3)) / n, (t * m).sum((2, 3)) / n  # (B, 3)
            terms["loss_mean"] = self.mean_weight * (mu_p - mu_t).square().sum(1).mean()
        return total(terms)
