"""Body-part segmentation: a confusion matrix accumulated over the data set, then IoU and accuracy per class.

Definitions (those of the official ``SegEvaluator``; it prints the means x100, rounded to 2 decimals, we return
fractions in [0, 1]):

* pixels whose target is ``ignore_index`` (255 by default), or that ``valid`` marks invalid, are not counted;
* ``IoU[c] = TP / (TP + FP + FN)`` over the whole data set (not averaged per image);
* a class absent from both the predictions and the targets has 0 / 0 = NaN IoU and is left out of ``mIoU``
  (the official ``np.nanmean``); a class predicted but never in the targets has IoU 0 and counts;
* ``Acc[c] = TP / (TP + FN)`` (NaN for a class absent from the targets), ``mAcc`` its NaN-mean, ``aAcc`` the
  fraction of all counted pixels labelled right.

Predictions are either label maps of the target's shape, or logits with a class axis ((C, H, W) or
(B, C, H, W)), argmax-ed over it; with ``resize=True`` logits of another (H, W) are first resampled bilinearly
to the target's size, as the official evaluator does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._common import as_scalar_maps, as_tensor, check_finite, valid_mask

__all__ = ["SegmentationMetric", "segmentation_metrics", "confusion_matrix", "metrics_from_confusion"]


def _labels(pred, target, num_classes: int, resize: bool):
    t = as_scalar_maps(target, "target")
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"target must hold integer class labels, got dtype {t.dtype}")
    p = as_tensor(pred, "pred").to(t.device)
    if p.is_floating_point():
        # logits: one more axis than the (squeezed) target, classes on axis -3
        if p.ndim == 3:
            p = p.unsqueeze(0)
        if p.ndim != 4 or p.shape[0] != t.shape[0]:
            raise ValueError(f"floating-point pred is taken as logits (C, H, W) or (B, C, H, W); got shape "
                             f"{tuple(p.shape)} for a target of shape {tuple(t.shape)}")
        if p.shape[1] != num_classes:
            raise ValueError(f"logits have {p.shape[1]} classes, expected num_classes={num_classes}")
        check_finite(p, "pred")
        if p.shape[-2:] != t.shape[-2:]:
            if not resize:
                raise ValueError(f"logits are {tuple(p.shape[-2:])} but target is {tuple(t.shape[-2:])} (H, W); "
                                 "pass resize=True to resample them bilinearly")
            p = F.interpolate(p.float(), size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False,
                              antialias=False)
        p = p.argmax(dim=1)
    else:
        if p.dtype == torch.bool or p.is_complex():
            raise TypeError(f"pred must be integer labels or floating-point logits, got dtype {p.dtype}")
        p = as_scalar_maps(p, "pred")
        if p.shape != t.shape:
            raise ValueError(f"pred labels shape {tuple(p.shape)} does not match target shape {tuple(t.shape)}")
    return p.long(), t.long()


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = 255, valid=None,
                     resize: bool = False) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    p, t = _labels(pred, target, num_classes, resize)
    m = valid_mask(valid, tuple(t.shape), t.device)
    if ignore_index is not None:
        m = m & (t != ignore_index)
    p, t = p[m], t[m]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"target labels {bad} are outside [0, {num_classes}) and not ignore_index={ignore_index}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        bad = p[(p < 0) | (p >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"predicted labels {bad} are outside [0, {num_classes})")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(conf, class_names: Sequence[str] | None = None) -> dict:
    c = as_tensor(conf, "confusion").to(torch.float64).cpu().numpy()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {c.shape}")
    tp = np.diag(c)
    gt = c.sum(axis=1)
    pr = c.sum(axis=0)
    union = gt + pr - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union  # 0/0 -> NaN: class in neither predictions nor targets
        acc = tp / gt
    total = c.sum()
    out = {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": iou,
        "Acc": acc,
    }
    if class_names is not None:
        if len(class_names) != c.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {c.shape[0]} classes")
        out["class_names"] = list(class_names)
    return out


class SegmentationMetric:
    """Accumulates a confusion matrix; ``compute()`` gives mIoU, mAcc, aAcc and per-class IoU / Acc."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names: Sequence[str] | None = None,
                 resize: bool = False):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.resize = resize
        self.reset()

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None

    def update(self, pred, target, valid=None) -> None:
        conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index, valid, self.resize)
        self.confusion = conf if self.confusion is None else self.confusion + conf.to(self.confusion.device)

    def merge(self, other: "SegmentationMetric") -> None:
        """Add another accumulator's counts (e.g. one gathered from another process)."""
        if other.confusion is not None:
            self.confusion = (other.confusion.clone() if self.confusion is None
                              else self.confusion + other.confusion.to(self.confusion.device))

    def compute(self) -> dict:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            raise ValueError("no pixels accumulated: call update() with at least one counted pixel first")
        return metrics_from_confusion(self.confusion, self.class_names)


def segmentation_metrics(pred, target, num_classes: int, ignore_index: int | None = 255, valid=None,
                         class_names: Sequence[str] | None = None, resize: bool = False) -> dict:
    """One-shot form of :class:`SegmentationMetric` over a batch (or a single map)."""
    m = SegmentationMetric(num_classes, ignore_index, class_names, resize)
    m.update(pred, target, valid)
    return m.compute()
