"""Pointmap (camera-frame XYZ per pixel) loss: the seven terms of the official pointmap config.

Inputs: ``pred``, ``target`` ``(B, 3, H, W)`` pointmaps (X, Y, Z), ``valid_mask`` ``(B, 1, H, W)``
(bool or 0/1; default ``target[:, 0] > -100``), ``pred_scale``, ``target_scale`` ``(B,)`` or
``(B, 1)`` (the canonical-to-metric scale, ``canonical XYZ = scale * XYZ``), ``intrinsics`` ``(B, 3, 3)``,
``mean_depth`` ``(B,)`` (default: the mean target Z over valid pixels, as the data pipeline computes
it). ``m`` is the mask as float, ``N = max(sum m, 1)``; sums run over ``b, c, h, w``. ``P = pred / mean_depth``,
``T = target / mean_depth`` (per sample).

Terms with the config weights, routed as the official ``PointmapHead.loss`` does (L1, multiscale
and shift-invariant on the depth-normalised maps, each clamped at 4 after weighting)::

    loss_l1              = min(2 * sum m |P - T| / N, 4)                                   (L1Loss)
    loss_multiscale_l1_2 = min(1 * sum m2 |up(P) - up(T)| / max(sum m2, 1), 4)          (MultiscaleL1Loss)
                           up: bilinear x2 (align_corners=False), m2: nearest x2 of m
    loss_silog           = 1 * mean_b sqrt(E[d^2] - 0.5 E[d]^2),                         (SiLogLoss on Z)
                           d = log(max(Tz, 1e-4)) - log(max(Pz, 1e-4)) (raw Z), E over valid pixels
                           of sample b (valid: m > 0, Tz > -100, d not NaN; count clamped at 1e-4)
    loss_K_consistency   = 1 * sum m (|X - (u - cx) Z / fx| + |Y - (v - cy) Z / fy|) / N  (raw pred,
                           u, v: integer column / row index)   (PointmapIntrinsicsConsistencyLoss)
    loss_shift_invariant = min(1 * sum m |(P - cP) - (T - cT)| / N, 4),                  (PointmapShiftInvariantL1Loss)
                           cX = sum_hw m X / (sum_hw m + 1e-6) per sample and channel
    loss_normal          = 2 * sum vt ((1 - clamp(<nP, nT>, -1, 1)) + mean_c |nP - nT|) / max(sum vt, 1)
                           (PointmapNormalLoss, l1_weight=1)
    loss_scale_l1        = 4 * mean_b |pred_scale - target_scale|                        (PointmapScaleL1Loss)

Normals: ``x = pointmap / target_scale`` (both maps), ``dx = x[:, :, :, j+1] - x[:, :, :, j]``,
``dy = x[:, :, i+1] - x[:, :, i]`` (reflecting at the last row / column), ``n = (100 dx) x (100 dy)``,
``n_hat = n / max(|n|, 1e-6)``, zeroed where ``|n| <= 1e-6`` or ``m = 0``; ``vt`` is that validity of
the target normals.

The paper summary describes the scale head (``P = s * P_tilde``) but not the losses; the terms above
are the config's. Differences from the official on degenerate input only: a sample whose SiLog
variance is 0 (e.g. no valid pixel) gets a zero gradient instead of NaN; NaN targets outside the
mask are ignored. The multiscale term (bilinear upsampling) and the normal term (neighbour
differences) read masked target values next to valid pixels, as the official does; a masked NaN
reads as 0 there (the official normal term would be NaN). Bad input raises ``ValueError``: differing
shapes, not 3 channels, NaN targets inside the mask, a missing ``intrinsics`` / ``pred_scale`` /
``target_scale`` that a weighted term needs, non-positive ``target_scale`` or ``mean_depth``.
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


def _per_sample(name: str, t: Optional[Tensor], B: int, acc: torch.dtype, positive: bool, check: bool) -> Tensor:
    """A per-sample scalar given as ``(B,)``, ``(B, 1)`` or ``(B, 1, 1, 1)``, as ``(B,)`` in ``acc``."""
    if t is None:
        raise ValueError(f"{name} is required by a weighted term of this loss")
    check_float(name, t)
    if t.dim() == 0 or t.shape[0] != B or t.numel() != B:
        raise ValueError(f"{name} must have shape ({B},) or ({B}, 1), got {tuple(t.shape)}")
    t = t.reshape(B).to(acc)
    if check and values_checkable(t):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite values")
        if positive and not (t > 0).all():
            raise ValueError(f"{name} must be positive, got {t.tolist()}")
    return t


def _normals(x: Tensor, valid: Tensor, amp: float = 100.0, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    right = torch.cat([x[..., 1:], x[..., -2:-1]], dim=-1)  # reflect at the last column
    down = torch.cat([x[..., 1:, :], x[..., -2:-1, :]], dim=-2)  # reflect at the last row
    n = torch.linalg.cross((right - x) * amp, (down - x) * amp, dim=1)
    mag = n.norm(dim=1, keepdim=True)
    ok = (mag > eps) & valid
    return n / mag.clamp(min=eps) * ok, ok


def _silog(pz: Tensor, tz: Tensor, valid: Tensor, invalid_value: float, eps: float = 1e-4) -> Tensor:
    pz, tz, valid = pz.flatten(1), tz.flatten(1), valid.flatten(1)
    d = torch.log(tz.clamp(min=eps)) - torch.log(pz.clamp(min=eps))
    ok = valid & (tz > invalid_value) & ~torch.isnan(d)
    d = torch.where(ok, d, 0)
    n = ok.sum(1).to(d.dtype).clamp(min=eps)
    var = d.square().sum(1) / n - 0.5 * (d.sum(1) / n).square()
    pos = var > 0
    return torch.where(pos, torch.where(pos, var, 1).sqrt(), 0).mean()  # safe sqrt: zero grad at 0


class PointmapLoss(nn.Module):
    """The official pointmap loss combination. Returns the seven ``loss_*`` terms and ``loss``."""

    def __init__(
        self,
        l1_weight: float = 2.0,
        multiscale_weight: float = 1.0,
        multiscale_factor: int = 2,
        silog_weight: float = 1.0,
        k_consistency_weight: float = 1.0,
        shift_invariant_weight: float = 1.0,
        normal_weight: float = 2.0,
        normal_l1_weight: float = 1.0,
        scale_weight: float = 4.0,
        clamp_max: Optional[float] = 4.0,
        invalid_value: float = -100.0,
        check_inputs: bool = True,
    ):
        super().__init__()
        self.l1_weight = float(l1_weight)
        self.multiscale_weight = float(multiscale_weight)
        self.multiscale_factor = multiscale_factor
        self.silog_weight = float(silog_weight)
        self.k_consistency_weight = float(k_consistency_weight)
        self.shift_invariant_weight = float(shift_invariant_weight)
        self.normal_weight = float(normal_weight)
        self.normal_l1_weight = float(normal_l1_weight)
        self.scale_weight = float(scale_weight)
        self.clamp_max = clamp_max
        self.invalid_value = invalid_value
        self.check_inputs = check_inputs

    def _clamp(self, x: Tensor) -> Tensor:
        return x if self.clamp_max is None else x.clamp(max=self.clamp_max)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        valid_mask: Optional[Tensor] = None,
        *,
        pred_scale: Optional[Tensor] = None,
        target_scale: Optional[Tensor] = None,
        intrinsics: Optional[Tensor] = None,
        mean_depth: Optional[Tensor] = None,
    ) -> dict:
        check_float("pred", pred, 4, "(B, 3, H, W) pointmap")
        check_float("target", target, 4, "(B, 3, H, W) pointmap")
        check_same_shape("pred", pred, "target", target)
        B, C, H, W = pred.shape
        if C != 3:
            raise ValueError(f"pred must have 3 channels (XYZ), got shape {tuple(pred.shape)}")
        if self.normal_weight and (H < 2 or W < 2):
            raise ValueError(f"pred must be at least 2x2 pixels for the normal term, got shape {tuple(pred.shape)}")
        ck = self.check_inputs
        acc = acc_dtype(pred)
        valid = valid_mask_of(valid_mask, target, self.invalid_value, ck)
        t = clean_target("target", target.to(acc), valid, ck)
        p = pred.to(acc)
        m = valid.to(acc)

        terms = {}
        if self.l1_weight or self.multiscale_weight or self.shift_invariant_weight:
            if mean_depth is None:
                cnt = m.sum((1, 2, 3))
                md = torch.where(cnt > 0, (t[:, 2:3] * m).sum((1, 2, 3)) / cnt.clamp(min=1), 1)
                if ck and values_checkable(md) and not (md > 0).all():
                    raise ValueError("the mean target depth over valid pixels must be positive (pass mean_depth)")
            else:
                md = _per_sample("mean_depth", mean_depth, B, acc, True, ck)
            P, T = p / md.view(B, 1, 1, 1), t / md.view(B, 1, 1, 1)
            if self.l1_weight:
                terms["loss_l1"] = self._clamp(self.l1_weight * masked_pixel_mean((P - T).abs(), m))
            if self.multiscale_weight:
                f = self.multiscale_factor
                up = lambda x: F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)  # noqa: E731
                m2 = F.interpolate(m, scale_factor=f, mode="nearest")
                terms[f"loss_multiscale_l1_{f}"] = self._clamp(self.multiscale_weight * masked_pixel_mean((up(P) - up(T)).abs(), m2))
        if self.silog_weight:
            terms["loss_silog"] = self.silog_weight * _silog(p[:, 2], t[:, 2], valid[:, 0], self.invalid_value)
        if self.k_consistency_weight:
            if intrinsics is None:
                raise ValueError("intrinsics (B, 3, 3) is required when k_consistency_weight > 0")
            check_float("intrinsics", intrinsics)
            if tuple(intrinsics.shape) != (B, 3, 3):
                raise ValueError(f"intrinsics must have shape {(B, 3, 3)}, got {tuple(intrinsics.shape)}")
            K = intrinsics.to(acc)
            fx, fy, cx, cy = (K[:, i, j].view(B, 1, 1) for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
            u = torch.arange(W, device=p.device, dtype=acc).view(1, 1, W)
            v = torch.arange(H, device=p.device, dtype=acc).view(1, H, 1)
            Z = p[:, 2]
            err = (p[:, 0] - (u - cx) * Z / fx).abs() + (p[:, 1] - (v - cy) * Z / fy).abs()
            terms["loss_K_consistency"] = self.k_consistency_weight * masked_pixel_mean(err[:, None], m)
        if self.shift_invariant_weight:
            n = m.sum((2, 3), keepdim=True) + 1e-6
            cP, cT = (P * m).sum((2, 3), keepdim=True) / n, (T * m).sum((2, 3), keepdim=True) / n
            terms["loss_shift_invariant"] = self._clamp(self.shift_invariant_weight * masked_pixel_mean(((P - cP) - (T - cT)).abs(), m))
        if self.normal_weight:
            s = _per_sample("target_scale", target_scale, B, acc, True, ck).view(B, 1, 1, 1)
            nP, _ = _normals(p / s, valid)
            nT, vt = _normals(t / s, valid)
            cos = (nP * nT).sum(1, keepdim=True).clamp(-1, 1)
            e = (1 - cos) + self.normal_l1_weight * (nP - nT).abs().mean(1, keepdim=True)
            terms["loss_normal"] = self.normal_weight * masked_pixel_mean(e, vt.to(acc))
        if self.scale_weight:
            ps = _per_sample("pred_scale", pred_scale, B, acc, False, False)
            ts = _per_sample("target_scale", target_scale, B, acc, True, ck)
            terms["loss_scale_l1"] = self.scale_weight * (ps - ts).abs().mean()
        return total(terms)
