"""2D rotary position embedding tables, computed exactly as the official Sapiens2 code does.

Coordinates are patch centres normalised per axis to [-1, 1]; each of the D/4 periods gives an
angle for the row and the column coordinate, laid out ``[h-angles, w-angles]`` and tiled twice
(the rotate-half convention). The official default computes everything in bf16 (including the
``periods`` buffer stored in checkpoints); ``dtype=torch.float32`` gives exact tables.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Rope2D(nn.Module):
    def __init__(self, head_dim: int, base: float = 100.0, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.dtype = dtype
        # persistent: the official checkpoints carry it (``rope_embed.periods``)
        self.register_buffer("periods", torch.empty(head_dim // 4, dtype=dtype), persistent=True)
        if self.periods.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.head_dim
        idx = torch.arange(d // 4, device=self.periods.device, dtype=self.dtype)
        self.periods.data = self.base ** (2 * idx / (d // 2))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) must not round the tables' periods: keep their dtype, follow the device.
        before = self.periods
        super()._apply(fn, recurse)
        if self.periods.dtype != before.dtype and not before.is_meta:
            self.periods = before.to(device=self.periods.device)
        elif self.periods.dtype != before.dtype:
            self.periods = torch.empty_like(before, device=self.periods.device)
        return self

    def forward(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        """(sin, cos) of shape ``(H*W, head_dim)`` in the RoPE dtype, row-major over the grid."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, D/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, D)
        return torch.sin(angles), torch.cos(angles)
