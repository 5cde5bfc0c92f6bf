"""Input checks shared by the dense metrics: array conversion, batch layout, valid masks, finiteness.

Every dense metric takes ``torch.Tensor`` or ``numpy.ndarray`` inputs, works in float64 on the device of
its inputs (so an accumulator fed CUDA tensors never copies to the host until ``compute``), and raises
``TypeError`` for a wrong kind of input and ``ValueError`` for a wrong shape, range or a NaN."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not supported")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def as_float_maps(x, name: str, channels: int) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) with C == channels -> float64 (B, C, H, W)."""
    t = as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real-valued map, got dtype {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name} must be ({channels}, H, W) or (B, {channels}, H, W), got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def as_scalar_maps(x, name: str) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) -> (B, H, W), dtype kept."""
    t = as_tensor(x, name)
    if t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(t.shape)}")
        t = t[:, 0]
    elif t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim != 3:
        raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(t.shape)}")
    return t


def valid_mask(valid, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """The (B, H, W) bool mask of pixels to score. ``None``: every pixel. A bool mask is taken as is, a numeric
    one as ``valid > 0`` (the official evaluators' ``mask > 0``). (H, W) masks apply to every image."""
    B, H, W = shape
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = as_tensor(valid, "valid")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2 and tuple(m.shape) == (H, W):
        m = m.unsqueeze(0).expand(B, H, W)
    if tuple(m.shape) != (B, H, W):
        raise ValueError(f"valid must be (H, W), (B, H, W) or (B, 1, H, W) matching the target's {(B, H, W)}, "
                         f"got shape {tuple(as_tensor(valid, 'valid').shape)}")
    if m.dtype != torch.bool:
        if m.is_floating_point() and not torch.isfinite(m).all():
            raise ValueError("valid contains NaN or inf")
        m = m > 0
    return m.to(device)


def check_same_shape(pred: torch.Tensor, target: torch.Tensor, resize: bool, what: str = "pred") -> torch.Tensor:
    """Return ``pred`` with the target's spatial size. A different batch or channel count is an error; a different
    (H, W) is an error unless ``resize``, which resamples bilinearly (align_corners=False, no antialias), the way
    the official dense evaluators bring a low-resolution prediction to the ground truth's size."""
    if pred.shape[:-2] != target.shape[:-2]:
        raise ValueError(f"{what} shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    if pred.shape[-2:] != target.shape[-2:]:
        if not resize:
            raise ValueError(f"{what} is {tuple(pred.shape[-2:])} but target is {tuple(target.shape[-2:])} (H, W); "
                             "resize the prediction first or pass resize=True")
        squeeze = pred.ndim == 3
        p = pred.unsqueeze(1) if squeeze else pred
        p = F.interpolate(p, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False, antialias=False)
        pred = p[:, 0] if squeeze else p
    return pred


def check_finite(t: torch.Tensor, name: str, mask: torch.Tensor | None = None) -> None:
    """NaN/inf in ``t`` (only where ``mask``, a (B, H, W) mask, when given) is an error."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if t.ndim == 4 and mask is not None:
        bad = bad.any(dim=1) & mask
    elif mask is not None:
        bad = bad & mask
    if bad.any():
        where = " at valid pixels" if mask is not None else ""
        raise ValueError(f"{name} contains NaN or inf{where}")


def to_float(x: torch.Tensor) -> float:
    return float(x.item())


class SumAccumulator:
    """Base of the dense accumulators: float64 running sums kept in one vector ``totals`` (on the inputs'
    device), so merging two accumulators, or all-reducing ``totals`` across processes, is a plain addition."""

    def reset(self) -> None:
        self.totals: torch.Tensor | None = None

    def _config(self) -> tuple:
        return ()

    def _add(self, vec: torch.Tensor) -> None:
        vec = vec.to(torch.float64)
        self.totals = vec if self.totals is None else self.totals + vec.to(self.totals.device)

    def merge(self, other) -> None:
        """Add another accumulator's sums (same class and settings), e.g. one gathered from another process."""
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__} with other settings")
        if other.totals is not None:
            self._add(other.totals.clone())

    def _totals_or_raise(self, count_index: int, what: str = "valid pixels") -> list[float]:
        if self.totals is None or float(self.totals[count_index].item()) == 0:
            raise ValueError(f"no {what} accumulated: call update() with at least one first")
        return self.totals.cpu().tolist()
