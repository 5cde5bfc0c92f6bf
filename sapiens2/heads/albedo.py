"""Albedo (diffuse colour) head.

Layout (``state_dict`` keys, ``U`` upsample blocks, ``M`` extra convs)::

    input_conv.0.{weight,bias}             (C, C, 3, 3), (C,)
    input_conv.1.norm.weight               (C,)
    upsample_blocks.{u}.0.{weight,bias}    (4 * U_u, U_in_u, 3, 3), (4 * U_u,)
    upsample_blocks.{u}.2.norm.weight      (U_u,)
    conv_layers.{3j}.{weight,bias}         (D_j, D_in_j, k_j, k_j), (D_j,)
    conv_layers.{3j+1}.norm.weight         (D_j,)
    conv_albedo.{weight,bias}              (3, D_last, 1, 1), (3,)

The normal head's skeleton with per-pixel RMS normalisation over channels (eps 1e-6, learnable
per-channel scale) in place of InstanceNorm: instance statistics would remove the global
brightness/colour that albedo has to keep.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ._common import FeatureInput, SubPixelTrunk, feature_map, init_head_weights, resize, rms_norm


class AlbedoHead(SubPixelTrunk):
    """Feature map ``(B, in_channels, h, w)`` -> albedo ``(B, 3, h * 2**U, w * 2**U)`` (RGB, ~[0, 1],
    not clamped).

    Args:
        in_channels: backbone width.
        upsample_channels: output channels of each PixelShuffle x2 block.
        conv_out_channels / conv_kernel_sizes: optional convs at full resolution.
        channels: accepted for compatibility with the official config dicts; unused (as upstream).
    """

    def __init__(
        self,
        in_channels: int = 768,
        upsample_channels: Sequence[int] = (768, 384, 192, 96),
        conv_out_channels: Optional[Sequence[int]] = None,
        conv_kernel_sizes: Optional[Sequence[int]] = None,
        channels: int = 16,
    ):
        super().__init__(in_channels, upsample_channels, conv_out_channels, conv_kernel_sizes, rms_norm)
        self.conv_albedo = nn.Conv2d(self.out_features, 3, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_head_weights(self)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                m.reset_parameters()

    def forward(self, x: FeatureInput) -> Tensor:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns ``(B, 3, h * 2**U, w * 2**U)``."""
        return self.conv_albedo(self.trunk(feature_map(x, self.in_channels)))

    @staticmethod
    def postprocess(albedo: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        """Bilinear resize of ``(B, 3, H, W)`` to ``size`` ``(height, width)``."""
        if not isinstance(albedo, Tensor) or albedo.ndim != 4 or albedo.shape[1] != 3:
            raise ValueError("albedo must be a (B, 3, H, W) tensor")
        return resize(albedo, size)
