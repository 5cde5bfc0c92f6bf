"""Alpha-matting head (our design; there is no official Sapiens2 matting head).

Design: the normal head's sub-pixel trunk with a 1-channel output and a sigmoid.

* ``input_conv``: 3x3 conv C -> C, InstanceNorm, SiLU, to mix neighbouring tokens before upsampling.
* ``upsample_blocks``: one block per entry of ``upsample_channels``, each 3x3 conv to 4x channels ->
  PixelShuffle(2) -> InstanceNorm -> SiLU. Sub-pixel convs rather than transposed convs because
  alpha is continuous and hair-level detail suffers from checkerboard artefacts; four blocks take a
  patch-16 feature map back to the input resolution.
* ``conv_layers``: optional full-resolution convs (conv, InstanceNorm, SiLU) to refine edges.
* ``conv_alpha``: 1x1 conv to one logit; ``forward`` applies a sigmoid so alpha is in [0, 1].

If the upsampler's total factor ``2**len(upsample_channels)`` differs from ``patch_size``, the
logits are bilinearly resized to ``patch_size`` times the feature map before the sigmoid, so the
alpha is always at the input resolution.

Layout (``state_dict`` keys)::

    input_conv.0.{weight,bias}             (C, C, 3, 3), (C,)
    upsample_blocks.{u}.0.{weight,bias}    (4 * U_u, U_in_u, 3, 3), (4 * U_u,)
    conv_layers.{3j}.{weight,bias}         (D_j, D_in_j, k_j, k_j), (D_j,)
    conv_alpha.{weight,bias}               (1, D_last, 1, 1), (1,)

Everything but ``conv_alpha`` has the normal head's key names and shapes (for the same
hyper-parameters), so a trained normal head can warm-start a matting head:
:meth:`MattingHead.load_trunk`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import FeatureInput, SubPixelTrunk, check_int, feature_map, init_head_weights, instance_norm, resize

TRUNK_PREFIXES = ("input_conv.", "upsample_blocks.", "conv_layers.")


class MattingHead(SubPixelTrunk):
    """Feature map ``(B, in_channels, h, w)`` -> alpha ``(B, 1, h * patch_size, w * patch_size)`` in [0, 1].

    Args:
        in_channels: backbone width.
        upsample_channels: output channels of each PixelShuffle x2 block (4 blocks for patch 16).
        conv_out_channels / conv_kernel_sizes: optional convs at full resolution.
        patch_size: the backbone's patch size; the output is ``patch_size`` times the feature map.
    """

    def __init__(
        self,
        in_channels: int = 768,
        upsample_channels: Sequence[int] = (768, 384, 192, 96),
        conv_out_channels: Optional[Sequence[int]] = (64, 32, 16),
        conv_kernel_sizes: Optional[Sequence[int]] = (3, 3, 3),
        patch_size: int = 16,
    ):
        super().__init__(in_channels, upsample_channels, conv_out_channels, conv_kernel_sizes, instance_norm)
        self.patch_size = check_int("patch_size", patch_size)
        self.conv_alpha = nn.Conv2d(self.out_features, 1, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero output bias (from init_head_weights): alpha starts at 0.5 everywhere, the least
        # committed value for a BCE/L1 fine-tune.
        init_head_weights(self)

    def logits(self, x: FeatureInput) -> Tensor:
        """Pre-sigmoid alpha ``(B, 1, h * patch_size, w * patch_size)``; train on these with
        ``binary_cross_entropy_with_logits`` for numerical stability."""
        x = feature_map(x, self.in_channels)
        out = self.conv_alpha(self.trunk(x))
        target = (x.shape[-2] * self.patch_size, x.shape[-1] * self.patch_size)
        if tuple(out.shape[-2:]) != target:
            out = F.interpolate(out, size=target, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: FeatureInput) -> Tensor:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns alpha ``(B, 1, h * patch_size, w * patch_size)`` in [0, 1]."""
        return torch.sigmoid(self.logits(x))

    @staticmethod
    def postprocess(alpha: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        """Bilinear resize of ``(B, 1, H, W)`` alpha to ``size`` ``(height, width)``, kept in [0, 1]."""
        if not isinstance(alpha, Tensor) or alpha.ndim != 4 or alpha.shape[1] != 1:
            raise ValueError("alpha must be a (B, 1, H, W) tensor")
        return resize(alpha, size).clamp_(0.0, 1.0)

    def load_trunk(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy ``input_conv`` / ``upsample_blocks`` / ``conv_layers`` from a normal-head (or
        pointmap-head) state dict with the same hyper-parameters; ``conv_alpha`` is left as is.
        Raises ``RuntimeError`` (from ``load_state_dict``) if a trunk key is missing or mis-shaped."""
        trunk = {k: v for k, v in state_dict.items() if k.startswith(TRUNK_PREFIXES)}
        missing, unexpected = self.load_state_dict(trunk, strict=False)
        missing = [k for k in missing if not k.startswith("conv_alpha.")]
        if missing:
            raise RuntimeError(f"state_dict lacks trunk keys: {missing}")
