"""Per-step schedules, precomputed as arrays indexed by the optimizer step (so resuming at step k
reads entry k: nothing to save but the step)."""

from __future__ import annotations

import math

import numpy as np


def warmup_cosine(steps: int, peak: float, end: float, warmup: int = 0, start: float = 0.0) -> np.ndarray:
    """Linear ``start -> peak`` over ``warmup`` steps, then a half cosine ``peak -> end`` at the last step."""
    out = np.empty(steps, dtype=np.float64)
    w = min(max(warmup, 0), steps)
    if w:
        out[:w] = start + (peak - start) * np.arange(w) / w
    n = steps - w
    if n:
        t = np.arange(n) / max(n - 1, 1)
        out[w:] = end + (peak - end) * 0.5 * (1 + np.cos(math.pi * t))
    return out


def warmup_constant(steps: int, peak: float, warmup: int = 0, start: float = 0.0) -> np.ndarray:
    out = np.full(steps, peak, dtype=np.float64)
    w = min(max(warmup, 0), steps)
    if w:
        out[:w] = start + (peak - start) * np.arange(w) / w
    return out


def lr_schedule(steps: int, peak: float, min_lr: float, warmup: int, kind: str) -> np.ndarray:
    if kind == "cosine":
        return warmup_cosine(steps, peak, min_lr, warmup)
    if kind == "constant":
        return warmup_constant(steps, peak, warmup)
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")
