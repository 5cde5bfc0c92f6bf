"""Albedo: per-pixel colour errors over valid pixels, PSNR, a gradient error and a masked SSIM.

Definitions (those of the official ``AlbedoEvaluator``):

* ``mae``: per pixel the mean over the 3 channels of ``|pred - target|``, averaged over every valid pixel of
  the data set; ``mse`` likewise with squares, ``rmse = sqrt(mse)``;
* ``psnr = 10 log10(R^2 / max(mse, 1e-12))`` from the pooled ``mse`` (not a mean of per-image PSNRs). The data
  range ``R`` is ``data_range`` when given, else decided once from the first batch as the official does:
  255 if that batch's target maximum is above 1.5, else 1;
* ``grad_l1``: mean absolute difference of the forward differences (x and y pooled) of pred and target, each
  difference counted where both of its pixels are valid, channel-averaged;
* ``ssim`` (``ssim=True``): SSIM with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 R)^2,
  C2 = (0.03 R)^2, local moments normalised by the window's valid-pixel weight, the map channel-averaged and
  averaged over the pixels whose window weight of valid pixels exceeds 0.5; zero padding outside the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import SumAccumulator, as_float_maps, check_finite, check_same_shape, valid_mask

__all__ = ["AlbedoMetric", "albedo_metrics", "psnr_from_mse"]


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """``10 log10(R^2 / mse)`` with mse floored at 1e-12 (so a perfect prediction gives a finite 120 dB for R=1)."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if not math.isfinite(mse) or mse < 0:
        raise ValueError(f"mse must be a finite non-negative number, got {mse}")
    return 10.0 * math.log10(data_range ** 2 / max(mse, 1e-12))


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(ax * ax) / (2.0 * sigma * sigma))
    k = torch.outer(g, g)
    return k / k.sum()


def _masked_ssim(p: torch.Tensor, t: torch.Tensor, m: torch.Tensor, data_range: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) maps, (B, H, W) mask -> (sum of SSIM over counted pixels, count)."""
    eps = 1e-8
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    B, C, H, W = p.shape
    k = _gaussian_window(11, 1.5, p.dtype, p.device)[None, None]
    mw = m[:, None].to(p.dtype)
    wsum = F.conv2d(mw, k, padding=5).clamp_min(eps)  # (B, 1, H, W)

    def local_mean(z):  # mask-weighted local mean per channel
        return F.conv2d((z * mw).reshape(B * C, 1, H, W), k, padding=5).reshape(B, C, H, W) / wsum

    mu_p, mu_t = local_mean(p), local_mean(t)
    var_p = local_mean(p * p) - mu_p * mu_p
    var_t = local_mean(t * t) - mu_t * mu_t
    cov = local_mean(p * t) - mu_p * mu_t
    ssim = ((2 * mu_p * mu_t + C1) * (2 * cov + C2)) / ((mu_p * mu_p + mu_t * mu_t + C1) * (var_p + var_t + C2) + eps)
    ssim = ssim.mean(dim=1)  # (B, H, W)
    counted = wsum[:, 0] > 0.5
    return ssim[counted].sum(), counted.sum().to(torch.float64)


class AlbedoMetric(SumAccumulator):
    """Accumulates albedo errors: ``update(pred, target, valid=None)`` with (3, H, W) or (B, 3, H, W) maps and an
    optional (H, W) / (B, H, W) / (B, 1, H, W) mask.

    ``totals`` = [abs-error sum, squared-error sum, pixel count, gradient abs-error sum, gradient count,
    SSIM sum, SSIM count]."""

    def __init__(self, data_range: float | None = None, ssim: bool = True, resize: bool = False):
        if data_range is not None and data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        self.fixed_range = data_range
        self.ssim = ssim
        self.resize = resize
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.data_range = self.fixed_range

    def _config(self) -> tuple:
        return self.ssim, self.fixed_range

    def merge(self, other: "AlbedoMetric") -> None:
        if other.totals is not None and self.totals is not None and other.data_range != self.data_range:
            raise ValueError(f"cannot merge albedo sums over data range {other.data_range} into {self.data_range}")
        super().merge(other)
        if self.data_range is None:
            self.data_range = other.data_range

    def update(self, pred, target, valid=None) -> None:
        t = as_float_maps(target, "target", 3)
        p = check_same_shape(as_float_maps(pred, "pred", 3).to(t.device), t, self.resize)
        m = valid_mask(valid, (t.shape[0], t.shape[2], t.shape[3]), t.device)
        check_finite(t, "target", m)
        check_finite(p, "pred", m)
        if self.data_range is None:
            self.data_range = 255.0 if float(t.max()) > 1.5 else 1.0
        # non-finite values outside the mask must not leak through the window sums
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        p = torch.where(m[:, None], p, zero)
        t = torch.where(m[:, None], t, zero)
        d = p - t
        abs_sum = d.abs().mean(dim=1)[m].sum()
        sq_sum = (d * d).mean(dim=1)[m].sum()
        n = m.sum().to(torch.float64)
        mh = m[:, :, 1:] & m[:, :, :-1]
        mv = m[:, 1:, :] & m[:, :-1, :]
        gh = (d[..., 1:] - d[..., :-1]).abs().mean(dim=1)[mh].sum()
        gv = (d[..., 1:, :] - d[..., :-1, :]).abs().mean(dim=1)[mv].sum()
        g_n = (mh.sum() + mv.sum()).to(torch.float64)
        if self.ssim:
            s_sum, s_n = _masked_ssim(p, t, m, self.data_range)
        else:
            s_sum = s_n = torch.zeros((), dtype=torch.float64, device=t.device)
        self._add(torch.stack([abs_sum, sq_sum, n, gh + gv, g_n, s_sum, s_n]))

    def compute(self) -> dict:
        l1, l2, n, g, g_n, s, s_n = self._totals_or_raise(2)
        mse = l2 / n
        out = {"mae": l1 / n, "mse": mse, "rmse": math.sqrt(mse), "psnr": psnr_from_mse(mse, self.data_range),
               "grad_l1": g / max(g_n, 1.0)}
        if self.ssim:
            out["ssim"] = s / max(s_n, 1.0)
        out["data_range"] = self.data_range
        out["num_pixels"] = int(n)
        return out


def albedo_metrics(pred, target, valid=None, data_range: float | None = None, ssim: bool = True,
                   resize: bool = False) -> dict:
    """One-shot form of :class:`AlbedoMetric`."""
    m = AlbedoMetric(data_range, ssim, resize)
    m.update(pred, target, valid)
    return m.compute()
