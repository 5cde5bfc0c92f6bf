"""Task heads for Sapiens2 feature maps: pose, seg, normal, pointmap, albedo (the official heads,
loading official checkpoints' ``decode_head.*`` weights with ``strict=True``) and matting (ours).

Every head takes the backbone's final feature map ``(B, embed_dims, H/16, W/16)``, i.e. the output
of ``Sapiens2Backbone(out_type="featmap")`` (a tuple/list whose first element is that map is also
accepted), and returns what the official head returns::

    from sapiens2.heads import build_head
    head = build_head("normal", "sapiens2_1b")          # released 1b hyper-parameters
    head.load_state_dict(decode_head_state_dict)         # keys without the "decode_head." prefix
    normals = head(backbone(images))                     # (B, 3, H, W)
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .albedo import AlbedoHead
from .configs import ARCHS, EMBED_DIMS, TASKS, head_config
from .matting import MattingHead
from .normal import NormalHead
from .pointmap import PointmapHead
from .pose import PoseHeatmapHead
from .seg import SegHead

HEADS: dict[str, type[nn.Module]] = {
    "pose": PoseHeatmapHead,
    "seg": SegHead,
    "normal": NormalHead,
    "pointmap": PointmapHead,
    "albedo": AlbedoHead,
    "matting": MattingHead,
}


def build_head(task: str, arch: Optional[str] = None, **overrides) -> nn.Module:
    """Build the ``task`` head.

    Args:
        task: one of ``"pose"``, ``"seg"``, ``"normal"``, ``"pointmap"``, ``"albedo"``, ``"matting"``.
        arch: ``"sapiens2_0.4b"`` / ``"0.8b"`` / ``"1b"`` / ``"5b"`` (prefix optional) for the released
            hyper-parameters; ``None`` for the head class's own defaults.
        **overrides: constructor kwargs replacing the table's (e.g. ``num_classes=``,
            ``out_channels=`` for a custom keypoint count, ``in_channels=``).

    Build on the meta device (``with torch.device("meta"): ...``) to size a head without memory.
    """
    if task not in HEADS:
        raise ValueError(f"unknown task {task!r}; choose one of {tuple(HEADS)}")
    kwargs = head_config(task, arch) if arch is not None else {}
    kwargs.update(overrides)
    if task == "pose" and "out_channels" not in kwargs:
        raise TypeError("the pose head needs out_channels (the keypoint count) when arch is None")
    return HEADS[task](**kwargs)


__all__ = [
    "ARCHS",
    "EMBED_DIMS",
    "HEADS",
    "TASKS",
    "AlbedoHead",
    "MattingHead",
    "NormalHead",
    "PointmapHead",
    "PoseHeatmapHead",
    "SegHead",
    "build_head",
    "head_config",
]
