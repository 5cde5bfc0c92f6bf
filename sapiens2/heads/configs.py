"""Per-arch head hyper-parameters of the released Sapiens2 task models.

Values read from the official configs (facebookresearch/sapiens2, all at 1024x768 crops, patch 16):

* pose:     ``sapiens/pose/configs/keypoints308/shutterstock_goliath_3po/sapiens2_<arch>_*.py``
* seg:      ``sapiens/dense/configs/seg/shutterstock_goliath/sapiens2_<arch>_*.py``
* normal:   ``sapiens/dense/configs/normal/metasim_render_people/sapiens2_<arch>_*.py``
* pointmap: ``sapiens/dense/configs/pointmap/render_people/sapiens2_<arch>_*.py``
* albedo:   ``sapiens/dense/configs/albedo/render_people/sapiens2_<arch>_*.py``

``in_channels`` is the backbone's ``embed_dims`` in every config. Matting has no official config;
its table reuses the normal head's widths so a normal checkpoint can warm-start it.
"""

from __future__ import annotations

import copy
from typing import Any

ARCHS = ("sapiens2_0.4b", "sapiens2_0.8b", "sapiens2_1b", "sapiens2_5b")

# ``embed_dim`` of each config (= the backbone width the head consumes).
EMBED_DIMS = {"sapiens2_0.4b": 1024, "sapiens2_0.8b": 1280, "sapiens2_1b": 1536, "sapiens2_5b": 2432}

IMAGE_SIZE = (1024, 768)  # (height, width) of the released task models' inputs
PATCH_SIZE = 16
FEATURE_SIZE = (IMAGE_SIZE[0] // PATCH_SIZE, IMAGE_SIZE[1] // PATCH_SIZE)  # (64, 48)
NUM_KEYPOINTS = 308
NUM_SEG_CLASSES = 29
HEATMAP_SIZE = (IMAGE_SIZE[0] // 4, IMAGE_SIZE[1] // 4)  # pose codec: (256, 192)
CANONICAL_FOCAL_LENGTH = 768.0  # pointmap: scale = canonical focal / actual focal

# Pointmap scale MLP input: the configs write (num_tokens // (8 * 8)) * 128, i.e. the 64x48 token
# grid after three stride-2 convs (8x6) times 128 channels.
_NUM_TOKENS = FEATURE_SIZE[0] * FEATURE_SIZE[1]
_SCALE_IN = (_NUM_TOKENS // ((2 * 2 * 2) * (2 * 2 * 2))) * 128  # 6144

_POSE_SMALL = dict(deconv_out_channels=(1024, 768), deconv_kernel_sizes=(4, 4),
                   conv_out_channels=(512, 512, 256), conv_kernel_sizes=(1, 1, 1))
_SEG = dict(deconv_out_channels=(512, 256, 128, 64), deconv_kernel_sizes=(4, 4, 4, 4),
            conv_out_channels=(64, 64), conv_kernel_sizes=(1, 1), num_classes=NUM_SEG_CLASSES)
_DENSE = dict(upsample_channels=(768, 512, 256, 128), conv_out_channels=(64, 32, 16), conv_kernel_sizes=(3, 3, 3))
_DENSE_5B_NORMAL = dict(upsample_channels=(1536, 768, 512, 256), conv_out_channels=(128, 64, 32), conv_kernel_sizes=(3, 3, 3))
_SCALE = dict(scale_conv_out_channels=(1536, 512, 128), scale_conv_kernel_sizes=(1, 1, 1),
              scale_final_layer=(_SCALE_IN, 512, 128, 1))

# task -> arch -> constructor kwargs without in_channels
_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "pose": {
        # 0.4b, 0.8b and 5b configs all use the narrower head; only 1b widens it.
        "sapiens2_0.4b": dict(out_channels=NUM_KEYPOINTS, **_POSE_SMALL),
        "sapiens2_0.8b": dict(out_channels=NUM_KEYPOINTS, **_POSE_SMALL),
        "sapiens2_1b": dict(out_channels=NUM_KEYPOINTS, deconv_out_channels=(1536, 1024), deconv_kernel_sizes=(4, 4),
                            conv_out_channels=(768, 512, 256), conv_kernel_sizes=(1, 1, 1)),
        "sapiens2_5b": dict(out_channels=NUM_KEYPOINTS, **_POSE_SMALL),
    },
    "seg": {arch: dict(_SEG) for arch in ARCHS},
    "normal": {
        "sapiens2_0.4b": dict(_DENSE),
        "sapiens2_0.8b": dict(_DENSE),
        "sapiens2_1b": dict(_DENSE),
        "sapiens2_5b": dict(_DENSE_5B_NORMAL),
    },
    "pointmap": {
        "sapiens2_0.4b": dict(upsample_channels=(1536, 768, 512, 256), conv_out_channels=(64, 32, 16), conv_kernel_sizes=(3, 3, 3), **_SCALE),
        "sapiens2_0.8b": dict(upsample_channels=(1536, 768, 512, 256), conv_out_channels=(64, 32, 16), conv_kernel_sizes=(3, 3, 3), **_SCALE),
        "sapiens2_1b": dict(upsample_channels=(1536, 768, 512, 256), conv_out_channels=(64, 32, 16), conv_kernel_sizes=(3, 3, 3), **_SCALE),
        "sapiens2_5b": dict(upsample_channels=(1536, 768, 768, 768), conv_out_channels=(128, 64, 32), conv_kernel_sizes=(3, 3, 3), **_SCALE),
    },
    "albedo": {
        "sapiens2_0.4b": dict(_DENSE),
        "sapiens2_0.8b": dict(_DENSE),
        "sapiens2_1b": dict(_DENSE),
        # 5b widens the upsampler but keeps the 64/32/16 convs (unlike the 5b normal head).
        "sapiens2_5b": dict(upsample_channels=(1536, 768, 512, 256), conv_out_channels=(64, 32, 16), conv_kernel_sizes=(3, 3, 3)),
    },
    # ours: the normal head's widths
    "matting": {
        "sapiens2_0.4b": dict(_DENSE),
        "sapiens2_0.8b": dict(_DENSE),
        "sapiens2_1b": dict(_DENSE),
        "sapiens2_5b": dict(_DENSE_5B_NORMAL),
    },
}

TASKS = tuple(_TABLE)


def resolve_arch(arch: str) -> str:
    """``"1b"``, ``"sapiens2_1b"`` -> ``"sapiens2_1b"``; ``ValueError`` for unknown names."""
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    name = arch if arch.startswith("sapiens2_") else f"sapiens2_{arch}"
    if name not in EMBED_DIMS:
        raise ValueError(f"arch {arch!r} has no released task heads; choose one of {ARCHS}")
    return name


def head_config(task: str, arch: str) -> dict[str, Any]:
    """Constructor kwargs (``in_channels`` included) of the released ``task`` head for ``arch``.
    A fresh copy: callers may edit it."""
    if task not in _TABLE:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    name = resolve_arch(arch)
    return dict(in_channels=EMBED_DIMS[name], **copy.deepcopy(_TABLE[task][name]))
