"""Alpha-matting loss (our own; the official Sapiens2 release has no matting task).

Inputs: ``pred``, ``target`` alpha ``(B, 1, H, W)`` (``target`` in [0, 1]; ``pred`` is used as given,
apply a sigmoid / clamp before if the head does not), ``valid_mask`` ``(B, 1, H, W)`` (bool or 0/1;
default: every pixel whose target is not NaN), optionally ``image``, ``fg``, ``bg`` ``(B, 3, H, W)``
(all three or none). ``m`` is the mask as float, ``N = max(sum m, 1)``.

Terms (default weights 1, 1, 1)::

    loss_alpha = w_a * sum m |pred - target| / N
    loss_grad  = w_g * sum m (|Sx * pred - Sx * target| + |Sy * pred - Sy * target|) / N
    loss_comp  = w_c * sum_{b,c,h,w} m |pred * fg + (1 - pred) * bg - image| / (3 N)   (only if image/fg/bg given)

``Sx``, ``Sy`` are the 3x3 Sobel filters ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` (and its transpose),
applied with replicate padding so the image border does not look like an edge. ``loss_grad`` is an L1
on the Sobel responses (it penalises blurred or misplaced alpha edges, which the per-pixel L1 barely
sees); ``loss_comp`` is the Deep-Image-Matting composition loss in L1 form (it weights alpha errors by
how much they change the re-composited colour).

Bad input raises: differing shapes or not one channel (``ValueError``), target outside [0, 1] or NaN
inside the mask (``ValueError``), only some of ``image``/``fg``/``bg`` given or of the wrong shape
(``ValueError``), non-tensors (``TypeError``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    acc_dtype,
    check_float,
    check_same_shape,
    clean_target,
    masked_pixel_mean,
    total,
    valid_mask_of,
    values_checkable,
)

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(x: Tensor) -> Tensor:
    """``(B, 1, H, W)`` -> ``(B, 2, H, W)``: the x and y Sobel responses, replicate-padded."""
    k = torch.stack([_SOBEL, _SOBEL.t()])[:, None].to(x)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


class MattingLoss(nn.Module):
    """Alpha L1 + Sobel-gradient L1 (+ composition L1). Returns ``{"loss_alpha", "loss_grad", ["loss_comp"], "loss"}``."""

    def __init__(self, alpha_weight: float = 1.0, grad_weight: float = 1.0, comp_weight: float = 1.0, check_inputs: bool = True):
        super().__init__()
        self.alpha_weight = float(alpha_weight)
        self.grad_weight = float(grad_weight)
        self.comp_weight = float(comp_weight)
        self.check_inputs = check_inputs

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        valid_mask: Optional[Tensor] = None,
        *,
        image: Optional[Tensor] = None,
        fg: Optional[Tensor] = None,
        bg: Optional[Tensor] = None,
    ) -> dict:
        check_float("pred", pred, 4, "(B, 1, H, W) alpha")
        check_float("target", target, 4, "(B, 1, H, W) alpha")
        check_same_shape("pred", pred, "target", target)
        B, C, H, W = pred.shape
        if C != 1:
            raise ValueError(f"pred must have 1 channel (alpha), got shape {tuple(pred.shape)}")
        ck = self.check_inputs
        acc = acc_dtype(pred)
        valid = ~torch.isnan(target) if valid_mask is None else valid_mask_of(valid_mask, target, 0.0, ck)
        t = clean_target("target", target.to(acc), valid, ck)
        if ck and values_checkable(t) and ((t < 0) | (t > 1)).any():
            raise ValueError("target alpha must lie in [0, 1]")
        p = pred.to(acc)
        m = valid.to(acc)

        comp = [x is not None for x in (image, fg, bg)]
        if any(comp) and not all(comp):
            missing = [n for n, x in zip(("image", "fg", "bg"), (image, fg, bg)) if x is None]
            raise ValueError(f"the composition loss needs image, fg and bg together; missing {', '.join(missing)}")

        terms = {}
        if self.alpha_weight:
            terms["loss_alpha"] = self.alpha_weight * masked_pixel_mean((p - t).abs(), m)
        if self.grad_weight:
            terms["loss_grad"] = self.grad_weight * masked_pixel_mean((sobel(p) - sobel(t)).abs(), m)
        if all(comp) and self.comp_weight:
            for name, x in (("image", image), ("fg", fg), ("bg", bg)):
                check_float(name, x)
                if tuple(x.shape) != (B, 3, H, W):
                    raise ValueError(f"{name} must have shape {(B, 3, H, W)}, got {tuple(x.shape)}")
            img, f, b = (clean_target(n, x.to(acc), valid, ck) for n, x in (("image", image), ("fg", fg), ("bg", bg)))
            err = (p * f + (1 - p) * b - img).abs()
            terms["loss_comp"] = self.comp_weight * masked_pixel_mean(err, m) / 3
        return total(terms)
