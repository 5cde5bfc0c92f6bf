"""Surface-normal loss: cosine + per-pixel L1 (or L2) + gradient matching, over valid pixels.

Inputs: ``pred``, ``target`` ``(B, 3, H, W)`` normals, ``valid_mask`` ``(B, 1, H, W)`` (bool or 0/1;
default ``target[:, 0] > -100``). ``m`` is the mask as float, ``N = max(sum m, 1)`` the number of valid
pixels; sums run over ``b, c, h, w``; ``n(x) = x / max(||x||_2, 1e-6)`` over channels.

Terms and default weights (the official normal config: ``NormalCosineSimilarityLoss(loss_weight=10)``,
``L1Loss(loss_weight=1)``, ``NormalGradL1Loss(loss_weight=10)``)::

    loss_cosine_sim = 10 * sum m * (1 - <n(pred), n(target)>) / N
    loss_l1         =  1 * sum m * |pred - target| / N              (pixel="l2": (pred - target)^2, key loss_l2)
    loss_grad_l1    = 10 * (Lx + Ly)

    Lx = sum mx * (dx(pred) - dx(target))^2 / max(sum mx, 1),  dx(X) = X[..., 1:] - X[..., :-1],
    mx = m[..., 1:] * m[..., :-1]   (both pixels of a pair valid); Ly likewise along H.

Note the per-pixel terms sum the 3 channels (divided by pixels, not elements), and the "grad L1" term
is, as in the official code, a squared error of forward differences.

Paper vs config: the paper summary lists "cosine, L2 and gradient" losses; the released config uses
L1 for the per-pixel term. The default is the config (``pixel="l1"``); ``pixel="l2"`` (or
``build_loss("normal", preset="paper")``) gives the paper's form with the same weights.

Bad input: differing shapes, a channel count other than 3 and NaN targets inside the valid region
raise ``ValueError`` (NaN targets outside it are ignored; the official would return 0 for the whole
term through its ``nan_to_num``).
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


class NormalLoss(nn.Module):
    """Cosine + L1/L2 + gradient loss for normals. Returns ``{"loss_cosine_sim", "loss_l1", "loss_grad_l1", "loss"}``."""

    def __init__(
        self,
        cosine_weight: float = 10.0,
        pixel_weight: float = 1.0,
        grad_weight: float = 10.0,
        pixel: str = "l1",
        norm_eps: float = 1e-6,
        invalid_value: float = -100.0,
        check_inputs: bool = True,
    ):
        super().__init__()
        self.cosine_weight = float(cosine_weight)
        self.pixel_weight = float(pixel_weight)
        self.grad_weight = float(grad_weight)
        self.pixel = check_pixel(pixel)
        self.norm_eps = norm_eps
        self.invalid_value = invalid_value
        self.check_inputs = check_inputs

    def forward(self, pred: Tensor, target: Tensor, valid_mask: Optional[Tensor] = None) -> dict:
        check_float("pred", pred, 4, "(B, 3, H, W) normals")
        check_float("target", target, 4, "(B, 3, H, W) normals")
        check_same_shape("pred", pred, "target", target)
        if pred.shape[1] != 3:
            raise ValueError(f"pred must have 3 channels (normals), got shape {tuple(pred.shape)}")
        acc = acc_dtype(pred)
        valid = valid_mask_of(valid_mask, target, self.invalid_value, self.check_inputs)
        t = clean_target("target", target.to(acc), valid, self.check_inputs)
        p = pred.to(acc)
        m = valid.to(acc)

        terms = {}
        if self.cosine_weight:
            eps = self.norm_eps
            cos = (p / p.norm(dim=1, keepdim=True).clamp(min=eps) * (t / t.norm(dim=1, keepdim=True).clamp(min=eps))).sum(1, keepdim=True)
            terms["loss_cosine_sim"] = self.cosine_weight * masked_pixel_mean(1 - cos, m)
        if self.pixel_weight:
            terms[f"loss_{self.pixel}"] = self.pixel_weight * masked_pixel_mean(pixel_error(p, t, self.pixel), m)
        if self.grad_weight:
            lx, ly = grad_mse(p, t, m)
            terms["loss_grad_l1"] = self.grad_weight * (lx + ly)
        return total(terms)
