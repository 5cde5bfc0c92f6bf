"""Surface normals: angular error between predicted and target normals over valid pixels.

Definitions (those of the official ``NormalEvaluator``):

* both maps are normalised per pixel, ``n / max(|n|, 1e-6)``, and the error is
  ``degrees(acos(clamp(<pred, target>, -1, 1)))``;
* ``mean_deg``, ``rmse_deg`` are pooled over every valid pixel of the data set (not averaged per image);
* ``pct_within_T`` is the percentage of valid pixels with error strictly below ``T`` degrees, for
  T in (5, 11.25, 22.5, 30) by default;
* ``median_deg`` comes from a 0.5-degree histogram of the errors, as the centre of the bin where the cumulative
  count reaches half the pixels: its resolution is the bin width, which keeps the accumulator's memory fixed.
  ``exact_median=True`` keeps every error instead (memory grows with the pixel count) and reports the exact
  median (the mean of the two middle values for an even count).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ._common import SumAccumulator, as_float_maps, check_finite, check_same_shape, valid_mask

__all__ = ["NormalMetric", "normal_metrics", "angular_error_deg"]


def _fmt(t: float) -> str:
    return f"{t:g}"


def angular_error_deg(pred, target, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel angle in degrees between two (B, 3, H, W) normal maps -> (B, H, W)."""
    p = pred / pred.norm(dim=1, keepdim=True).clamp_min(eps)
    t = target / target.norm(dim=1, keepdim=True).clamp_min(eps)
    dot = (p * t).sum(dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(dot))


class NormalMetric(SumAccumulator):
    """Accumulates angular-error statistics of normal maps: ``update(pred, target, valid=None)`` with
    (3, H, W) or (B, 3, H, W) maps and an optional (H, W) / (B, H, W) / (B, 1, H, W) mask.

    ``totals`` = [sum, sum of squares, pixel count, count below each threshold, histogram bins]."""

    def __init__(self, thresholds: Sequence[float] = (5.0, 11.25, 22.5, 30.0), bin_deg: float = 0.5,
                 exact_median: bool = False, resize: bool = False):
        if bin_deg <= 0:
            raise ValueError(f"bin_deg must be > 0, got {bin_deg}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.bin_deg = float(bin_deg)
        self.num_bins = int(math.ceil(180.0 / self.bin_deg))
        self.exact_median = exact_median
        self.resize = resize
        self.reset()

    def _config(self) -> tuple:
        return self.thresholds, self.bin_deg, self.exact_median

    def reset(self) -> None:
        super().reset()
        self.angles: list[torch.Tensor] = []

    def merge(self, other: "NormalMetric") -> None:
        super().merge(other)
        self.angles.extend(other.angles)

    def update(self, pred, target, valid=None) -> None:
        t = as_float_maps(target, "target", 3)
        p = check_same_shape(as_float_maps(pred, "pred", 3).to(t.device), t, self.resize)
        m = valid_mask(valid, (t.shape[0], t.shape[2], t.shape[3]), t.device)
        check_finite(t, "target", m)
        check_finite(p, "pred", m)
        ang = angular_error_deg(p, t)[m]
        thr = torch.tensor(self.thresholds, dtype=torch.float64, device=ang.device)
        below = (ang[:, None] < thr[None, :]).sum(dim=0).to(torch.float64)
        idx = torch.floor(ang / self.bin_deg).long().clamp_(0, self.num_bins - 1)
        hist = torch.bincount(idx, minlength=self.num_bins).to(torch.float64)
        head = torch.stack([ang.sum(), (ang * ang).sum(), torch.tensor(float(ang.numel()), dtype=torch.float64,
                                                                       device=ang.device)])
        self._add(torch.cat([head, below, hist]))
        if self.exact_median:
            self.angles.append(ang)

    def compute(self) -> dict:
        tot = self._totals_or_raise(2)
        s, s2, n = tot[:3]
        A = len(self.thresholds)
        below, hist = tot[3:3 + A], torch.tensor(tot[3 + A:], dtype=torch.float64)
        out = {"mean_deg": s / n, "rmse_deg": math.sqrt(s2 / n)}
        if self.exact_median:
            out["median_deg"] = float(np.median(torch.cat(self.angles).cpu().numpy()))
        else:
            cdf = torch.cumsum(hist, dim=0)
            b = int(torch.searchsorted(cdf, torch.tensor([0.5 * n], dtype=torch.float64)).clamp(
                max=self.num_bins - 1).item())
            out["median_deg"] = (b + 0.5) * self.bin_deg
        for t, c in zip(self.thresholds, below):
            out[f"pct_within_{_fmt(t)}"] = 100.0 * c / n
        out["num_pixels"] = int(n)
        return out


def normal_metrics(pred, target, valid=None, thresholds: Sequence[float] = (5.0, 11.25, 22.5, 30.0),
                   bin_deg: float = 0.5, exact_median: bool = False, resize: bool = False) -> dict:
    """One-shot form of :class:`NormalMetric`."""
    m = NormalMetric(thresholds, bin_deg, exact_median, resize)
    m.update(pred, target, valid)
    return m.compute()
