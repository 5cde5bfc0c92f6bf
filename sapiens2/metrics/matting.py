"""Alpha matting: SAD, MSE and the gradient error of the standard matting benchmarks.

The official Sapiens2 release has no matting evaluator, so these follow the customary definitions of the
matting benchmarks (alphamatting.com, Deep Image Matting's evaluation code, and the OpenMMLab re-implementations
of it). Alphas are in [0, 1] (uint8 inputs are divided by 255); the scored region is ``valid`` (for trimap
benchmarks: the unknown region, ``trimap == 128``), or the whole image when ``valid`` is None (the usual choice
for trimap-free human matting). Each metric is computed per image and then averaged over images; an image with
an empty region is skipped.

* ``sad`` = sum over the region of ``|pred - target|``, divided by 1000 (the benchmarks' reporting unit);
* ``mse`` = mean over the region of ``(pred - target)^2`` (papers often print it x1e3);
* ``grad`` = sum over the region of ``(|G pred'| - |G target'|)^2``, divided by 1000, where ``x'`` is ``x``
  min-max normalised to [0, 1] over the whole image (a constant image becomes all zeros) and ``|G x|`` the
  gradient magnitude from first-derivative-of-Gaussian filters: sigma = 1.4; kernel half-size
  ``ceil(sigma * sqrt(-2 ln(sqrt(2 pi) * sigma * eps)))`` with eps = 0.01 (= 4, a 9x9 kernel); the x-kernel is
  ``g(i) * g'(j)`` (g the normal density, g' its derivative, i the row and j the column offset), scaled to unit
  L2 norm, the y-kernel its transpose; borders replicate the edge pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import SumAccumulator, as_scalar_maps, check_finite, check_same_shape, valid_mask

__all__ = ["MattingMetric", "matting_metrics", "gaussian_gradient_magnitude"]

GRADIENT_SIGMA = 1.4
GRADIENT_EPSILON = 1e-2
NORM_CONST = 1000.0


def _gauss_derivative_kernels(sigma: float, epsilon: float, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    arg = math.sqrt(2 * math.pi) * sigma * epsilon
    if not 0 < arg < 1:
        raise ValueError(f"gradient sigma {sigma} with epsilon {epsilon} gives no valid kernel size")
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(arg)))
    r = torch.arange(-half, half + 1, dtype=dtype, device=device)
    g = torch.exp(-r * r / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
    dg = -r * g / (sigma * sigma)
    kx = torch.outer(g, dg)
    kx = kx / kx.square().sum().sqrt()
    return kx, kx.T.contiguous()


def gaussian_gradient_magnitude(alpha: torch.Tensor, sigma: float = GRADIENT_SIGMA,
                                epsilon: float = GRADIENT_EPSILON) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) gradient magnitude with first-derivative-of-Gaussian filters (module doc)."""
    kx, ky = _gauss_derivative_kernels(sigma, epsilon, alpha.dtype, alpha.device)
    h = kx.shape[0] // 2
    x = F.pad(alpha[:, None], (h, h, h, h), mode="replicate")
    gx = F.conv2d(x, kx[None, None])
    gy = F.conv2d(x, ky[None, None])
    return torch.sqrt(gx * gx + gy * gy)[:, 0]


def _minmax(a: torch.Tensor) -> torch.Tensor:
    lo = a.amin(dim=(1, 2), keepdim=True)
    hi = a.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(a))


def _alpha(x, name: str) -> torch.Tensor:
    t = as_scalar_maps(x, name)
    if t.dtype == torch.uint8:
        return t.to(torch.float64) / 255.0
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float alpha in [0, 1] or a uint8 alpha in [0, 255], got dtype {t.dtype}")
    t = t.to(torch.float64)
    check_finite(t, name)
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{float(t.min())}, {float(t.max())}] "
                         "(clamp the prediction, or divide a 0-255 alpha by 255)")
    return t


class MattingMetric(SumAccumulator):
    """Accumulates per-image SAD, MSE and gradient error: ``update(pred, target, valid=None)`` with (H, W),
    (B, H, W) or (B, 1, H, W) alphas and an optional region mask of the same layout.

    ``totals`` = [SAD sum, MSE sum, gradient-error sum, image count]."""

    def __init__(self, gradient_sigma: float = GRADIENT_SIGMA, resize: bool = False):
        _gauss_derivative_kernels(gradient_sigma, GRADIENT_EPSILON, torch.float64, "cpu")  # validates sigma
        self.gradient_sigma = float(gradient_sigma)
        self.resize = resize
        self.reset()

    def _config(self) -> tuple:
        return (self.gradient_sigma,)

    def update(self, pred, target, valid=None) -> None:
        t = _alpha(target, "target")
        p = check_same_shape(_alpha(pred, "pred").to(t.device), t, self.resize)
        m = valid_mask(valid, tuple(t.shape), t.device)
        keep = m.flatten(1).any(dim=1)
        if not keep.any():
            return
        p, t, m = p[keep], t[keep], m[keep]
        mf = m.to(torch.float64)
        d = p - t
        sad = (d.abs() * mf).sum(dim=(1, 2)) / NORM_CONST
        mse = (d * d * mf).sum(dim=(1, 2)) / mf.sum(dim=(1, 2))
        gp = gaussian_gradient_magnitude(_minmax(p), self.gradient_sigma)
        gt = gaussian_gradient_magnitude(_minmax(t), self.gradient_sigma)
        grad = ((gp - gt) ** 2 * mf).sum(dim=(1, 2)) / NORM_CONST
        n = torch.tensor(float(p.shape[0]), dtype=torch.float64, device=t.device)
        self._add(torch.stack([sad.sum(), mse.sum(), grad.sum(), n]))

    def compute(self) -> dict:
        sad, mse, grad, n = self._totals_or_raise(3, "images with a non-empty region")
        return {"sad": sad / n, "mse": mse / n, "grad": grad / n, "num_images": int(n)}


def matting_metrics(pred, target, valid=None, gradient_sigma: float = GRADIENT_SIGMA, resize: bool = False) -> dict:
    """One-shot form of :class:`MattingMetric` (per-image metrics averaged over the batch)."""
    m = MattingMetric(gradient_sigma, resize)
    m.update(pred, target, valid)
    return m.compute()
