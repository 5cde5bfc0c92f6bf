"""Task losses of the Sapiens2 heads, equal to the official loss modules on the same inputs.

One module per task; each loss is an ``nn.Module`` whose call returns a dict of named terms (the
official ``loss_name`` where the term exists there) plus ``loss``, their sum::

    from sapiens2.losses import build_loss
    crit = build_loss("seg")                          # CE (class-weighted) + Dice, as the 1B config
    out = crit(logits, labels); out["loss"].backward()

``build_loss(task, preset="config", **overrides)``: ``preset="config"`` (default) gives the terms and
weights of the released Sapiens2-1B configs; ``preset="paper"`` the variant the paper summary
describes where it differs (pose: OHKM top-128; normal: L2 per-pixel term; albedo: L2 + gradient +
mean alignment, no chromaticity). Keyword overrides go to the loss constructor.

=========  ==========================  ==========================================================
task       class                       config terms (weight)
=========  ==========================  ==========================================================
pose       KeypointHeatmapLoss         heatmap MSE with keypoint weights (10)
seg        SegLoss                     class-weighted CE (1), Dice without background (1)
pointmap   PointmapLoss                L1 (2), multiscale L1 (1), SiLog (1), K-consistency (1),
                                       shift-invariant L1 (1), normals (2), scale L1 (4)
normal     NormalLoss                  cosine (10), L1 (1), gradient (10)
albedo     AlbedoLoss                  L1 (2), gradient (2), chromaticity L1 (1)
matting    MattingLoss                 alpha L1 (1), Sobel gradient L1 (1), composition L1 (1); ours
=========  ==========================  ==========================================================
"""

from __future__ import annotations

from torch import nn

from .albedo import AlbedoLoss
from .matting import MattingLoss, sobel
from .normal import NormalLoss
from .pointmap import PointmapLoss
from .pose import KeypointHeatmapLoss
from .seg import CLASS_WEIGHT_29, SegLoss

LOSSES = {
    "pose": KeypointHeatmapLoss,
    "seg": SegLoss,
    "pointmap": PointmapLoss,
    "normal": NormalLoss,
    "albedo": AlbedoLoss,
    "matting": MattingLoss,
}

# Where the paper summary describes a task's losses differently from the released configs.
PAPER_PRESETS = {
    "pose": dict(ohem_topk=128, loss_weight=1.0),
    "normal": dict(pixel="l2"),
    "albedo": dict(pixel="l2", chroma_weight=0.0, mean_weight=1.0),
}

_ALIASES = {"keypoints": "pose", "keypoints308": "pose", "segmentation": "seg", "normals": "normal"}


def build_loss(task: str, preset: str = "config", **overrides) -> nn.Module:
    """The default loss combination of ``task`` (see the module docstring); ``overrides`` are
    constructor keyword arguments (e.g. ``build_loss("pose", ohem_topk=64)``)."""
    key = _ALIASES.get(task, task)
    if key not in LOSSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(LOSSES)}")
    if preset not in ("config", "paper"):
        raise ValueError(f"preset must be 'config' or 'paper', got {preset!r}")
    kwargs = dict(PAPER_PRESETS.get(key, {})) if preset == "paper" else {}
    kwargs.update(overrides)
    return LOSSES[key](**kwargs)


__all__ = [
    "AlbedoLoss",
    "CLASS_WEIGHT_29",
    "KeypointHeatmapLoss",
    "LOSSES",
    "MattingLoss",
    "NormalLoss",
    "PAPER_PRESETS",
    "PointmapLoss",
    "SegLoss",
    "build_loss",
    "sobel",
]
