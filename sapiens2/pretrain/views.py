"""Multi-crop views as tensor operations: 2 global + N local random resized crops per image.

The loader hands over whole images at one canvas size; every crop of the batch is then cut and
resized by one ``affine_grid`` + ``grid_sample`` (bilinear) on the device, so no per-view work runs in
the data workers. Boxes follow RandomResizedCrop: an area fraction drawn from the view's scale
range and an aspect jitter (log-uniform in [3/4, 4/3]) around the output's own aspect, so portrait
1024x768 views are not squashed. Horizontal flips are off by default: human left and right are
labels downstream (left/right keypoints and body parts). No colour augmentation: the MAE branch
reconstructs real colour, and the paper's point is not to decouple the views from the pixels.

Draws are per sample from ``(seed, step, sample index)`` streams (see ``seeding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .seeding import sample_generator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropSpec:
    """Output size ``(H, W)`` and area-fraction range of one kind of view."""

    size: tuple[int, int]
    scale: tuple[float, float]


def crop_boxes(gen: torch.Generator, n: int, in_hw: tuple[int, int], spec: CropSpec, ratio=(3 / 4, 4 / 3),
               flips: bool = False) -> Tensor:
    """``(n, 5)`` boxes ``(y0, x0, h, w, flip)`` in input pixels for ``n`` views of one image."""
    H, W = in_hw
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    area = H * W * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, 0])
    aspect = (spec.size[1] / spec.size[0]) * torch.exp(math.log(ratio[0]) + (math.log(ratio[1] / ratio[0])) * u[:, 1])
    h = torch.sqrt(area / aspect).clamp(max=H)
    w = (h * aspect).clamp(max=W)
    y0 = (H - h) * u[:, 2]
    x0 = (W - w) * u[:, 3]
    flip = (u[:, 4] < 0.5).double() if flips else torch.zeros(n, dtype=torch.float64)
    return torch.stack([y0, x0, h, w, flip], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop ``boxes`` ``(B, 5)`` out of ``images`` ``(B, 3, H, W)`` (float) and resize to ``size``."""
    B, _, H, W = images.shape
    y0, x0, h, w, flip = boxes.to(images.device, torch.float32).unbind(1)
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = (w / W) * (1 - 2 * flip)
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [B, 3, *size], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float -> ImageNet-normalised float32 (the backbone's input convention)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_crop(images: Tensor, sample_ids: Tensor, *, global_spec: CropSpec, local_spec: CropSpec,
               n_global: int = 2, n_local: int = 8, seed: int, step: int, flips: bool = False
               ) -> tuple[Tensor, Tensor]:
    """``(globals (n_global*B, 3, Hg, Wg), locals (n_local*B, 3, Hl, Wl))``, view-major (DINOv3's
    order: all samples of view 0, then view 1, ...), ImageNet-normalised float32."""
    B, C, H, W = images.shape
    if C != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    for name, spec in (("global", global_spec), ("local", local_spec)):
        if spec.size[0] > H or spec.size[1] > W:
            raise ValueError(f"the {name} crop size {spec.size[0]}x{spec.size[1]} is larger than the images "
                             f"({H}x{W}): raise data.image_size or lower the crop size")
    gb, lb = [], []
    for sid in sample_ids.tolist():
        g = sample_generator(seed, step, int(sid), stream=("crops",))
        gb.append(crop_boxes(g, n_global, (H, W), global_spec, flips=flips))
        lb.append(crop_boxes(g, n_local, (H, W), local_spec, flips=flips))
    x = normalize(images)
    glob = resized_crops(x.repeat(n_global, 1, 1, 1), torch.stack(gb, 1).flatten(0, 1), global_spec.size)
    if n_local == 0:
        return glob, x.new_empty(0, 3, *local_spec.size)
    loc = resized_crops(x.repeat(n_local, 1, 1, 1), torch.stack(lb, 1).flatten(0, 1), local_spec.size)
    return glob, loc
