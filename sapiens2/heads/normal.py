"""Surface-normal head.

Layout (``state_dict`` keys, ``U`` upsample blocks, ``M`` extra convs)::

    input_conv.0.{weight,bias}             (C, C, 3, 3), (C,)
    upsample_blocks.{u}.0.{weight,bias}    (4 * U_u, U_in_u, 3, 3), (4 * U_u,)
    conv_layers.{3j}.{weight,bias}         (D_j, D_in_j, k_j, k_j), (D_j,)
    conv_normal.{weight,bias}              (3, D_last, 1, 1), (3,)

Every conv except the last is followed by a parameter-free ``InstanceNorm2d`` and SiLU; each
upsample block is conv -> PixelShuffle(2) -> norm -> SiLU. The released configs use four blocks,
so the output is at the input resolution (16x the feature map).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._common import FeatureInput, SubPixelTrunk, feature_map, init_head_weights, instance_norm, resize


class NormalHead(SubPixelTrunk):
    """Feature map ``(B, in_channels, h, w)`` -> unnormalised normals ``(B, 3, h * 2**U, w * 2**U)``.

    Args:
        in_channels: backbone width.
        upsample_channels: output channels of each PixelShuffle x2 block.
        conv_out_channels / conv_kernel_sizes: optional convs at full resolution.
        channels: accepted for compatibility with the official config dicts; unused (as upstream).

    The raw output is not unit length; :meth:`postprocess` normalises it.
    """

    def __init__(
        self,
        in_channels: int = 768,
        upsample_channels: Sequence[int] = (768, 384, 192, 96),
        conv_out_channels: Optional[Sequence[int]] = None,
        conv_kernel_sizes: Optional[Sequence[int]] = None,
        channels: int = 16,
    ):
        super().__init__(in_channels, upsample_channels, conv_out_channels, conv_kernel_sizes, instance_norm)
        self.conv_normal = nn.Conv2d(self.out_features, 3, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_head_weights(self)

    def forward(self, x: FeatureInput) -> Tensor:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns ``(B, 3, h * 2**U, w * 2**U)`` (not normalised)."""
        return self.conv_normal(self.trunk(feature_map(x, self.in_channels)))

    @staticmethod
    def postprocess(normals: Tensor, size: Optional[Sequence[int]] = None, eps: float = 1e-8) -> Tensor:
        """Unit-normalise ``(B, 3, H, W)`` per pixel (norm clamped at ``eps``), then bilinearly
        resize to ``size`` ``(height, width)`` as the official demo does (no re-normalisation after
        the resize)."""
        if not isinstance(normals, Tensor) or normals.ndim != 4 or normals.shape[1] != 3:
            raise ValueError("normals must be a (B, 3, H, W) tensor")
        normals = normals / torch.linalg.vector_norm(normals, dim=1, keepdim=True).clamp(min=eps)
        return resize(normals, size)
