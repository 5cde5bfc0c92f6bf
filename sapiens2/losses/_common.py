"""Shared pieces of the task losses: input checks that name the argument, valid masks, masked
reductions.

Conventions (all task losses):

* Dense maps are ``(B, C, H, W)``; a valid mask is ``(B, 1, H, W)`` (or ``(B, H, W)``), bool or 0/1,
  and broadcasts over channels.
* A masked pixel mean divides by the number of valid *pixels*, not pixels x channels:
  ``sum_{b,c,h,w} m[b,h,w] * e[b,c,h,w] / max(sum m, 1)`` (the official convention).
* NaN in a target is allowed only where the mask is 0 (it is then ignored); NaN inside the valid
  region raises ``ValueError``. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_float(name: str, t, ndim: Optional[int] = None, what: str = "") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {what or f'{ndim}-D'}, got shape {tuple(t.shape)}")


def check_same_shape(pred_name: str, pred: Tensor, target_name: str, target: Tensor) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"{pred_name} {tuple(pred.shape)} and {target_name} {tuple(target.shape)} must have the same shape"
        )


def values_checkable(t: Tensor) -> bool:
    """Data-dependent checks (a host sync) run eagerly only, not on meta tensors or under compile."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def valid_mask_of(
    valid_mask: Optional[Tensor], target: Tensor, invalid_value: float, check: bool
) -> Tensor:
    """The ``(B, 1, H, W)`` bool valid mask.

    Given: ``(B, 1, H, W)`` or ``(B, H, W)``, bool or 0/1 (anything else is a ``ValueError``).
    Not given: the official default ``target[:, 0] > invalid_value`` (``invalid_value=-100``), which
    also marks pixels whose first target channel is NaN as invalid.
    """
    B, _, H, W = target.shape
    if valid_mask is None:
        return (target[:, :1] > invalid_value).detach()
    if not isinstance(valid_mask, Tensor):
        raise TypeError(f"valid_mask must be a torch.Tensor, got {type(valid_mask).__name__}")
    if valid_mask.dim() == 3:
        valid_mask = valid_mask[:, None]
    if tuple(valid_mask.shape) != (B, 1, H, W):
        raise ValueError(f"valid_mask must have shape {(B, 1, H, W)} (or {(B, H, W)}), got {tuple(valid_mask.shape)}")
    if valid_mask.dtype == torch.bool:
        return valid_mask
    if check and values_checkable(valid_mask) and not ((valid_mask == 0) | (valid_mask == 1)).all():
        raise ValueError("valid_mask must be binary (bool or 0/1)")
    return valid_mask != 0


def clean_target(name: str, target: Tensor, valid: Tensor, check: bool) -> Tensor:
    """``target`` with NaN outside ``valid`` (broadcastable bool) set to 0; NaN inside is a ValueError.

    The official losses multiply by the mask after the arithmetic, so one masked NaN turns the whole
    term into NaN, which their ``nan_to_num`` then silently makes 0; here masked NaNs are ignored.
    """
    nan = torch.isnan(target)
    if check and values_checkable(target) and (nan & valid).any():
        raise ValueError(f"{name} has NaN values inside the valid region (mask them out or fix the data)")
    return torch.where(nan, torch.zeros((), dtype=target.dtype, device=target.device), target)


def masked_pixel_mean(err: Tensor, m: Tensor) -> Tensor:
    """``sum(err * m) / max(sum(m), 1)``: ``err`` ``(B, C, H, W)``, ``m`` ``(B, 1, H, W)`` float (pixel count)."""
    return (err * m).sum() / m.sum().clamp(min=1)


def grad_mse(pred: Tensor, target: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Masked MSE of forward differences along x and y, each over its own valid pairs::

        dx(X) = X[..., :, 1:] - X[..., :, :-1]      mx = m[..., :, 1:] * m[..., :, :-1]
        Lx    = sum(mx * (dx(P) - dx(T))^2) / max(sum(mx), 1)      (same along y)

    ``pred``/``target`` ``(B, C, H, W)``, ``m`` ``(B, 1, H, W)`` float. Returns ``(Lx, Ly)``.
    """
    d = pred - target  # dx(P) - dx(T) == dx(P - T)
    ex = (d[..., :, 1:] - d[..., :, :-1]).square()
    ey = (d[..., 1:, :] - d[..., :-1, :]).square()
    return masked_pixel_mean(ex, m[..., :, 1:] * m[..., :, :-1]), masked_pixel_mean(ey, m[..., 1:, :] * m[..., :-1, :])


def check_pixel(kind: str) -> str:
    if kind not in ("l1", "l2"):
        raise ValueError(f"pixel must be 'l1' or 'l2', got {kind!r}")
    return kind


def pixel_error(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """``|pred - target|`` (``"l1"``) or ``(pred - target)^2`` (``"l2"``), elementwise."""
    d = pred - target
    return d.abs() if check_pixel(kind) == "l1" else d.square()


def total(terms: dict) -> dict:
    """Adds ``loss``: the sum of the named terms."""
    if not terms:
        raise ValueError("every term of this loss has weight 0 (or its inputs are missing): nothing to compute")
    out = dict(terms)
    out["loss"] = sum(terms.values())
    return out
