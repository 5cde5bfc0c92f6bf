"""Pointmaps (per-pixel 3D points): distance errors over valid pixels, and the angle between the surface
normals derived from the predicted and the target pointmap.

Definitions (those of the official ``PointmapEvaluator``):

* no alignment: the targets are canonical pointmaps and the prediction is compared as is (the official
  evaluator discards the predicted scale output and does no scale or shift fitting);
* ``l2_mean``: mean Euclidean distance ``|pred - target|`` over every valid pixel of the data set;
  ``rmse``: sqrt of the mean squared distance; ``x_mae``, ``y_mae``, ``z_mae``: mean absolute error per axis;
* ``pct_within_D``: percentage of valid pixels closer than ``D`` (in the pointmap's unit; metres for the
  official data, D in 0.05, 0.10, 0.20 by default). The official evaluator reports these as fractions;
* surface normals (``surface_normals=True``): each pointmap's x- and y-derivatives are taken with the 5x5
  Sobel operator (smoothing [1, 4, 6, 4, 1] x derivative [-1, -2, 0, 2, 1], borders mirrored without
  repeating the edge pixel, i.e. OpenCV's default BORDER_REFLECT_101) over the FULL map, the normal is their
  cross product divided by (norm + 1e-6), and only then are the valid pixels kept. ``normal_mean_deg``,
  ``normal_rmse_deg`` and ``pct_normal_within_T`` (T in 5, 11.25, 22.5, 30) follow. Non-finite values
  outside the valid mask are set to 0 before the derivatives (the official code would spread the NaN).
  At the image border the mirrored derivative along the border's normal direction is 0, so the normals
  there are degenerate (0, scoring 90 degrees): score interior pixels when that matters. The ``+ 1e-6``
  (rather than a clamp) also shortens every unit normal by ``1e-6 / |n|``, so two equal normals score
  ``acos((|n| / (|n| + 1e-6))^2)`` instead of 0: a floor of about 0.09 degrees for a 1 cm point spacing,
  larger for a finer one. We keep it: it is part of the official number.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ._common import SumAccumulator, as_float_maps, check_finite, check_same_shape, valid_mask

__all__ = ["PointmapMetric", "pointmap_metrics", "surface_normals"]

_SOBEL5_SMOOTH = (1.0, 4.0, 6.0, 4.0, 1.0)
_SOBEL5_DERIV = (-1.0, -2.0, 0.0, 2.0, 1.0)


def _fmt(t: float) -> str:
    return f"{t:g}"


def surface_normals(pointmap: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pointmap -> (B, 3, H, W) unit normals from 5x5 Sobel derivatives (see the module doc)."""
    B, C, H, W = pointmap.shape
    if H < 3 or W < 3:
        raise ValueError(f"surface normals need a pointmap of at least 3x3 pixels, got {H}x{W}")
    dt, dev = pointmap.dtype, pointmap.device
    smooth = torch.tensor(_SOBEL5_SMOOTH, dtype=dt, device=dev)
    deriv = torch.tensor(_SOBEL5_DERIV, dtype=dt, device=dev)
    kx = torch.outer(smooth, deriv)[None, None]  # d/dx: derivative along columns
    ky = torch.outer(deriv, smooth)[None, None]  # d/dy: derivative along rows
    x = F.pad(pointmap.reshape(B * C, 1, H, W), (2, 2, 2, 2), mode="reflect")
    gx = F.conv2d(x, kx).reshape(B, C, H, W)
    gy = F.conv2d(x, ky).reshape(B, C, H, W)
    n = torch.linalg.cross(gx, gy, dim=1)
    return n / (n.norm(dim=1, keepdim=True) + 1e-6)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


class PointmapMetric(SumAccumulator):
    """Accumulates pointmap errors: ``update(pred, target, valid=None)`` with (3, H, W) or (B, 3, H, W)
    pointmaps and an optional (H, W) / (B, H, W) / (B, 1, H, W) mask.

    ``totals`` = [l2 sum, |dx| sum, |dy| sum, |dz| sum, squared-distance sum, pixel count, count within each
    distance, then (normals) angle sum, squared-angle sum, count below each angle]."""

    def __init__(self, distance_thresholds: Sequence[float] = (0.05, 0.10, 0.20),
                 angle_thresholds: Sequence[float] = (5.0, 11.25, 22.5, 30.0), surface_normals: bool = True,
                 resize: bool = False):
        self.distance_thresholds = tuple(float(t) for t in distance_thresholds)
        self.angle_thresholds = tuple(float(t) for t in angle_thresholds)
        self.surface_normals = surface_normals
        self.resize = resize
        self.reset()

    def _config(self) -> tuple:
        return self.distance_thresholds, self.angle_thresholds, self.surface_normals

    def update(self, pred, target, valid=None) -> None:
        t = as_float_maps(target, "target", 3)
        p = check_same_shape(as_float_maps(pred, "pred", 3).to(t.device), t, self.resize)
        m = valid_mask(valid, (t.shape[0], t.shape[2], t.shape[3]), t.device)
        check_finite(t, "target", m)
        check_finite(p, "pred", m)
        pm, tm = p.permute(0, 2, 3, 1)[m], t.permute(0, 2, 3, 1)[m]  # (N, 3)
        diff = pm - tm
        dist = diff.norm(dim=-1)
        dthr = torch.tensor(self.distance_thresholds, dtype=torch.float64, device=t.device)
        parts = [dist.sum()[None], diff.abs().sum(dim=0), (dist * dist).sum()[None],
                 torch.tensor([float(dist.numel())], dtype=torch.float64, device=t.device),
                 (dist[:, None] < dthr[None, :]).sum(dim=0).to(torch.float64)]
        if self.surface_normals:
            n_p = surface_normals(_finite_or_zero(p)).permute(0, 2, 3, 1)[m]
            n_t = surface_normals(_finite_or_zero(t)).permute(0, 2, 3, 1)[m]
            ang = torch.rad2deg(torch.acos((n_p * n_t).sum(dim=-1).clamp(-1.0, 1.0)))
            athr = torch.tensor(self.angle_thresholds, dtype=torch.float64, device=t.device)
            parts += [ang.sum()[None], (ang * ang).sum()[None],
                      (ang[:, None] < athr[None, :]).sum(dim=0).to(torch.float64)]
        self._add(torch.cat(parts))

    def compute(self) -> dict:
        tot = self._totals_or_raise(5)
        l2, ax, ay, az, sq, n = tot[:6]
        D = len(self.distance_thresholds)
        out = {"l2_mean": l2 / n, "rmse": math.sqrt(sq / n), "x_mae": ax / n, "y_mae": ay / n, "z_mae": az / n}
        for thr, c in zip(self.distance_thresholds, tot[6:6 + D]):
            out[f"pct_within_{_fmt(thr)}"] = 100.0 * c / n
        if self.surface_normals:
            a, a2 = tot[6 + D:8 + D]
            out["normal_mean_deg"] = a / n
            out["normal_rmse_deg"] = math.sqrt(a2 / n)
            for thr, c in zip(self.angle_thresholds, tot[8 + D:]):
                out[f"pct_normal_within_{_fmt(thr)}"] = 100.0 * c / n
        out["num_pixels"] = int(n)
        return out


def pointmap_metrics(pred, target, valid=None, distance_thresholds: Sequence[float] = (0.05, 0.10, 0.20),
                     angle_thresholds: Sequence[float] = (5.0, 11.25, 22.5, 30.0), surface_normals: bool = True,
                     resize: bool = False) -> dict:
    """One-shot form of :class:`PointmapMetric`."""
    m = PointmapMetric(distance_thresholds, angle_thresholds, surface_normals, resize)
    m.update(pred, target, valid)
    return m.compute()
