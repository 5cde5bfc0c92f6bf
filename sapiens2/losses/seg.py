"""Body-part segmentation loss: class-weighted cross-entropy + soft Dice, with an ignore label.

Inputs: ``logits`` ``(B, C, H, W)`` (``C = num_classes``, 29 for Sapiens2), ``labels`` ``(B, H, W)``
(or ``(B, 1, H, W)``) integer class ids in ``[0, C)`` or ``ignore_index`` (255). Valid pixels:
``v = labels != ignore_index``. ``p = softmax(logits, dim=1)``.

Cross-entropy (the official ``CrossEntropyLoss(reduction="none", class_weight=CLASS_WEIGHT,
ignore_index=255)``; the trainer then takes ``.mean()`` of the per-pixel map)::

    loss_ce = lambda_ce * sum_{b,h,w} v * cw[y] * (logsumexp_c(logits) - logits[y]) / (B * H * W)

The denominator is *all* pixels (ignored ones included), not the class-weight sum.

Dice (the official ``DiceLoss(reduction="none", activate=True, use_sigmoid=False,
include_background=False, ignore_index=255, eps=1e-3)``, ``.mean()`` over the batch)::

    P = p * v,  G = onehot(y) * v                      classes c = 1..C-1 (background dropped)
    d[b,c]  = (2 sum_hw P G + eps) / (sum_hw P^2 + sum_hw G^2 + eps)     (naive_dice: P, G not squared)
    pres    = sum_hw G > 0                             classes present in the ground truth
    dice[b] = sum_c pres * d / max(sum_c pres, 1)
    loss_dice = lambda_dice * sum_b (1 - dice[b]) * any_c(pres[b]) / B

Samples with no valid pixel or no foreground class contribute 0 (still counted in ``B``).

The paper summary ("pixel-wise weighted cross-entropy and Dice loss", 29 classes) agrees with the
config. Bad input: a class id outside ``[0, C)`` that is not ``ignore_index``, a spatial size that
differs between ``logits`` and ``labels``, or a channel count other than ``num_classes`` raises
``ValueError``; non-integer labels raise ``TypeError``. (The official head resizes logits to the
label size before the loss; do that before calling.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_float, total, values_checkable

# Per-class cross-entropy weights of the official 29-class body-part config (class 0: background).
CLASS_WEIGHT_29 = (
    0.1, 10, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2, 6, 10, 3, 3, 1, 1, 10, 10, 10, 10, 10,
)  # fmt: skip


class SegLoss(nn.Module):
    """Weighted cross-entropy + Dice. Returns ``{"loss_ce", "loss_dice", "loss"}``."""

    def __init__(
        self,
        num_classes: int = 29,
        class_weight: Optional[Sequence[float]] = CLASS_WEIGHT_29,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        ignore_index: Optional[int] = 255,
        dice_eps: float = 1e-3,
        include_background: bool = False,
        naive_dice: bool = False,
        check_inputs: bool = True,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_weight is not None:
            class_weight = [float(c) for c in class_weight]
            if len(class_weight) != num_classes:
                raise ValueError(
                    f"class_weight has {len(class_weight)} entries but num_classes={num_classes} "
                    "(pass class_weight=None for unweighted cross-entropy)"
                )
            self.register_buffer("class_weight", torch.tensor(class_weight, dtype=torch.float64), persistent=False)
        else:
            self.class_weight = None
        self.num_classes = num_classes
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ignore_index = ignore_index
        self.dice_eps = dice_eps
        self.include_background = include_background
        self.naive_dice = naive_dice
        self.check_inputs = check_inputs

    def forward(self, logits: Tensor, labels: Tensor) -> dict:
        check_float("logits", logits, 4, "(B, C, H, W) class logits")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        B, C, H, W = logits.shape
        if tuple(labels.shape) != (B, H, W):
            raise ValueError(f"labels must have shape {(B, H, W)} (or {(B, 1, H, W)}) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
        if C != self.num_classes:
            raise ValueError(f"logits has {C} channels but num_classes={self.num_classes}")
        labels = labels.long()
        valid = labels != self.ignore_index if self.ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        if self.check_inputs and values_checkable(labels):
            bad = valid & ((labels < 0) | (labels >= C))
            if bad.any():
                v = labels[bad][0].item()
                raise ValueError(f"labels has class id {v} outside [0, {C}) (ignore_index={self.ignore_index})")
        y = torch.where(valid, labels, 0)  # (B, H, W), ignored pixels -> class 0, masked below
        x = logits.to(acc_dtype(logits))
        v = valid.to(x.dtype)

        terms = {}
        if self.ce_weight:
            nll = torch.logsumexp(x, 1) - x.gather(1, y[:, None])[:, 0]
            cw = v if self.class_weight is None else self.class_weight.to(x)[y] * v
            terms["loss_ce"] = self.ce_weight * (cw * nll).sum() / labels.numel()
        if self.dice_weight:
            p = x.softmax(1) * v[:, None]
            g = torch.nn.functional.one_hot(y, C).permute(0, 3, 1, 2).to(x.dtype) * v[:, None]
            if not self.include_background:
                p, g = p[:, 1:], g[:, 1:]
            inter = (p * g).sum((2, 3))
            if self.naive_dice:
                den = p.sum((2, 3)) + g.sum((2, 3))
            else:
                den = p.square().sum((2, 3)) + g.square().sum((2, 3))
            d = (2 * inter + self.dice_eps) / (den + self.dice_eps)  # (B, C')
            pres = (g.sum((2, 3)) > 0).to(x.dtype)
            dice = (d * pres).sum(1) / pres.sum(1).clamp(min=1)
            has_fg = pres.amax(1)
            terms["loss_dice"] = self.dice_weight * ((1 - dice) * has_fg).mean()
        return total(terms)
