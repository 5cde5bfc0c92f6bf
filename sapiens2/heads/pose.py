"""Top-down keypoint heatmap head (308 Goliath keypoints for the released models).

Layout (``state_dict`` keys, ``L`` transposed convs, ``M`` convs)::

    deconv_layers.{3i}.weight   (C_in_i, C_i, k_i, k_i)   ConvTranspose2d, stride 2, no bias
    conv_layers.{3j}.weight     (D_j, D_in_j, k_j, k_j)   Conv2d
    conv_layers.{3j}.bias       (D_j,)
    conv_pose.weight            (K, D_last, 1, 1)
    conv_pose.bias              (K,)

Each transposed conv / conv is followed by a parameter-free ``InstanceNorm2d`` and SiLU (indices
``3i+1``, ``3i+2``). The output heatmaps are at ``2**L`` times the feature map's resolution: with the
released configs (``L = 2``) a 1024x768 crop gives a 64x48 feature map and 256x192 heatmaps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._common import (
    FeatureInput,
    check_int,
    check_pair,
    check_size,
    conv_stack,
    deconv_stack,
    feature_map,
    init_head_weights,
)


class PoseHeatmapHead(nn.Module):
    """Feature map ``(B, in_channels, h, w)`` -> heatmaps ``(B, out_channels, h * 2**L, w * 2**L)``.

    Args:
        in_channels: backbone width (``embed_dims``).
        out_channels: number of keypoints ``K`` (308 for the released models).
        deconv_out_channels / deconv_kernel_sizes: one stride-2 transposed conv per entry; kernel
            sizes 4, 3 or 2 (each doubles the resolution exactly). Empty/None: no upsampling.
        conv_out_channels / conv_kernel_sizes: optional stride-1 convs after the upsampling.

    Defaults are the official constructor's defaults; the per-arch released values are in
    :mod:`sapiens2.heads.configs`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        deconv_out_channels: Optional[Sequence[int]] = (256, 256, 256),
        deconv_kernel_sizes: Optional[Sequence[int]] = (4, 4, 4),
        conv_out_channels: Optional[Sequence[int]] = None,
        conv_kernel_sizes: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        deconv_ch, deconv_k = check_pair("deconv_out_channels", deconv_out_channels, "deconv_kernel_sizes", deconv_kernel_sizes)
        conv_ch, conv_k = check_pair("conv_out_channels", conv_out_channels, "conv_kernel_sizes", conv_kernel_sizes)
        self.upsample_factor = 2 ** len(deconv_ch)

        self.deconv_layers = deconv_stack(in_channels, deconv_ch, deconv_k)
        ch = deconv_ch[-1] if deconv_ch else in_channels
        self.conv_layers = conv_stack(ch, conv_ch, conv_k)
        ch = conv_ch[-1] if conv_ch else ch
        self.conv_pose = nn.Conv2d(ch, out_channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The pose recipe also Kaiming-initialises the transposed convs.
        init_head_weights(self, (nn.Conv2d, nn.ConvTranspose2d))

    def forward(self, x: FeatureInput) -> Tensor:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns heatmaps ``(B, K, h * 2**L, w * 2**L)``."""
        x = feature_map(x, self.in_channels)
        return self.conv_pose(self.conv_layers(self.deconv_layers(x)))

    @staticmethod
    @torch.no_grad()
    def decode(heatmaps: Tensor, input_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Arg-max keypoints from heatmaps, mapped to input-crop pixels as the official UDP codec.

        Args:
            heatmaps: ``(B, K, Hh, Wh)``.
            input_size: the crop the model saw, ``(height, width)`` (e.g. ``(1024, 768)``).

        Returns:
            ``keypoints`` ``(B, K, 2)`` as (x, y) in crop pixels, and ``scores`` ``(B, K)`` (the peak
            value). Keypoints whose peak is <= 0 get heatmap location -1 before scaling, as upstream.

        UDP maps the heatmap grid's end points onto the crop's: ``x_img = x_hm / (Wh - 1) * W``.
        The official pipeline additionally refines each peak (DARK: Gaussian-blurred log-heatmap,
        second-order Taylor step); that sub-pixel refinement is not done here.
        """
        if not isinstance(heatmaps, Tensor) or heatmaps.ndim != 4:
            raise ValueError(
                f"heatmaps must be a 4-D tensor (B, K, H, W), got "
                f"{tuple(heatmaps.shape) if isinstance(heatmaps, Tensor) else type(heatmaps).__name__}"
            )
        H_in, W_in = check_size("input_size", input_size)
        B, K, H, W = heatmaps.shape
        if H < 2 or W < 2:
            raise ValueError(f"heatmaps must be at least 2x2 to decode, got {H}x{W}")
        scores, idx = heatmaps.flatten(2).max(dim=2)
        locs = torch.stack((idx % W, idx // W), dim=-1).to(torch.float32)
        locs[scores <= 0] = -1.0
        scale = torch.tensor([W_in / (W - 1), H_in / (H - 1)], dtype=torch.float32, device=locs.device)
        return locs * scale, scores
