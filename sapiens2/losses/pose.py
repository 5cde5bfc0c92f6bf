"""Keypoint heatmap loss (pose): weighted heatmap MSE, optionally online hard keypoint mining.

Inputs: ``pred``, ``target`` heatmaps ``(B, K, H, W)`` (``K = num_keypoints``, 308 for Sapiens2),
``target_weight`` ``(B, K)`` (or ``(B, 1, K)``, as the data pipeline packs it), 0 for keypoints that
are not annotated / not visible.

MSE (default; the official ``KeypointMSELoss(use_target_weight=True, loss_weight=10)`` of the
keypoints308 configs)::

    loss_kpt = lambda * sum_{b,k,h,w} w[b,k] * (pred - target)^2 / (B * K * H * W)

i.e. the mean over *all* elements, masked ones included (not over the weighted count). With
``skip_empty_channel`` the weight is further multiplied by ``any(target[b,k] != 0)``.

OHKM (``ohem_topk=k``; the official ``KeypointOHKMMSELoss``, commented out in the config as a
fine-tuning option with ``topk=128``)::

    l[b,k]   = mean_{h,w} (w[b,k] * pred - w[b,k] * target)^2  = w[b,k]^2 * mse[b,k]
    loss_kpt = lambda / B * sum_b (1/k) * sum(top-k_k l[b, :])

Paper vs config: the paper summary describes the pose loss as heatmap MSE *with OHEM*; the released
1B config trains with plain weighted MSE (``loss_weight=10``) and leaves OHKM commented out. The
default here is the config; ``build_loss("pose", preset="paper")`` gives OHKM with ``topk=128`` and
``loss_weight=1`` (that commented-out line).

Differences from the official on bad input only: NaN in ``target`` at keypoints with weight 0 is
ignored (the official returns NaN); NaN at weighted keypoints, a heatmap count other than
``num_keypoints``, mismatched shapes and ``topk > K`` raise ``ValueError``. The official
``KeypointMSELoss`` applies the weights whenever they are passed, whatever ``use_target_weight``
says; here ``use_target_weight=False`` ignores them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_float, check_same_shape, clean_target, total, values_checkable


class KeypointHeatmapLoss(nn.Module):
    """Weighted keypoint-heatmap MSE (+ optional OHKM). Returns ``{"loss_kpt", "loss"}``."""

    def __init__(
        self,
        num_keypoints: Optional[int] = 308,
        loss_weight: float = 10.0,
        use_target_weight: bool = True,
        skip_empty_channel: bool = False,
        ohem_topk: Optional[int] = None,
        check_inputs: bool = True,
    ):
        super().__init__()
        if ohem_topk is not None and ohem_topk <= 0:
            raise ValueError(f"ohem_topk must be a positive int or None, got {ohem_topk}")
        if ohem_topk is not None and skip_empty_channel:
            raise ValueError("skip_empty_channel applies to the plain MSE only, not with ohem_topk")
        if num_keypoints is not None and ohem_topk is not None and ohem_topk > num_keypoints:
            raise ValueError(f"ohem_topk ({ohem_topk}) must not exceed num_keypoints ({num_keypoints})")
        self.num_keypoints = num_keypoints
        self.loss_weight = float(loss_weight)
        self.use_target_weight = use_target_weight
        self.skip_empty_channel = skip_empty_channel
        self.ohem_topk = ohem_topk
        self.check_inputs = check_inputs

    def forward(self, pred: Tensor, target: Tensor, target_weight: Optional[Tensor] = None) -> dict:
        check_float("pred", pred, 4, "(B, K, H, W) heatmaps")
        check_float("target", target, 4, "(B, K, H, W) heatmaps")
        check_same_shape("pred", pred, "target", target)
        B, K, H, W = pred.shape
        if self.num_keypoints is not None and K != self.num_keypoints:
            raise ValueError(f"pred has {K} heatmaps but the loss expects num_keypoints={self.num_keypoints}")
        if self.ohem_topk is not None and self.ohem_topk > K:
            raise ValueError(f"ohem_topk ({self.ohem_topk}) must not exceed the number of keypoints ({K})")
        acc = acc_dtype(pred)
        w = None
        if self.use_target_weight and target_weight is not None:
            check_float("target_weight", target_weight)
            if target_weight.dim() == 3 and target_weight.shape[1] == 1:
                target_weight = target_weight[:, 0]
            if tuple(target_weight.shape) != (B, K):
                raise ValueError(f"target_weight must have shape {(B, K)} (or {(B, 1, K)}), got {tuple(target_weight.shape)}")
            if self.check_inputs and values_checkable(target_weight) and not torch.isfinite(target_weight).all():
                raise ValueError("target_weight has non-finite values")
            w = target_weight.to(acc)[:, :, None, None]
        valid = (w != 0) if w is not None else torch.ones((), dtype=torch.bool, device=pred.device)
        t = clean_target("target", target.to(acc), valid, self.check_inputs)
        p = pred.to(acc)

        if self.ohem_topk is None:
            if self.skip_empty_channel:
                nonempty = (t != 0).flatten(2).any(2)[:, :, None, None].to(acc)
                w = nonempty if w is None else w * nonempty
            se = (p - t).square()
            loss = (se if w is None else se * w).mean()
        else:
            d = (p - t) if w is None else (p * w - t * w)
            per_kpt = d.square().mean(dim=(2, 3))  # (B, K)
            loss = per_kpt.topk(self.ohem_topk, dim=1, sorted=False).values.sum(1).mean() / self.ohem_topk
        return total({"loss_kpt": loss * self.loss_weight})
