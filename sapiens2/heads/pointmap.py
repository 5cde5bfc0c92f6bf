"""Pointmap head: per-pixel 3-D points in a canonical camera, plus a global scale.

Layout (``state_dict`` keys)::

    input_conv.0.{weight,bias}               (C, C, 3, 3), (C,)
    upsample_blocks.{u}.0.{weight,bias}      (4 * U_u, U_in_u, 3, 3), (4 * U_u,)
    conv_layers.{3j}.{weight,bias}           (D_j, D_in_j, k_j, k_j), (D_j,)
    scale_conv_layers.{3s}.{weight,bias}     (S_s, S_in_s, k_s, k_s), (S_s,)     stride 2
    scale_final_layer.{2t+1}.{weight,bias}   (F_{t+1}, F_t), (F_{t+1},)          Linear
    conv_pointmap.{weight,bias}              (3, D_last, 1, 1), (3,)

Points branch: the normal head's trunk (InstanceNorm) and a 1x1 conv to XYZ. Scale branch, on the
raw feature map: stride-2 convs (InstanceNorm, SiLU each), flatten, then an MLP with SiLU between
the linears and a single output. Index 0 of ``scale_final_layer`` is the (parameter-free) flatten,
so the linears sit at the odd indices.

The scale is ``canonical_focal / actual_focal`` (the released configs use a canonical focal length
of 768 px), and the points are predicted for the canonical camera: metric points are
``pointmap / scale`` (:meth:`PointmapHead.postprocess`).

Because the scale MLP flattens the map, its first width fixes the feature-map size: the released
configs use ``(64 * 48 // 64) * 128 = 6144`` for 1024x768 crops (64x48 map -> 8x6 after three
stride-2 convs, times 128 channels). :meth:`PointmapHead.scale_in_features` computes it for other sizes.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ._common import (
    FeatureInput,
    SubPixelTrunk,
    check_int_list,
    check_pair,
    check_size,
    conv_stack,
    feature_map,
    init_head_weights,
    instance_norm,
    resize,
)


class PointmapHead(SubPixelTrunk):
    """Feature map ``(B, in_channels, h, w)`` -> ``(pointmap, scale)``:
    ``pointmap`` ``(B, 3, h * 2**U, w * 2**U)`` and ``scale`` ``(B, 1)`` (``None`` when the scale
    branch is disabled with ``scale_conv_out_channels=None``).

    Args:
        in_channels: backbone width.
        upsample_channels: output channels of each PixelShuffle x2 block.
        conv_out_channels / conv_kernel_sizes: optional convs at full resolution.
        scale_conv_out_channels / scale_conv_kernel_sizes: stride-2 convs of the scale branch.
        scale_final_layer: MLP widths, ``(flattened input, hidden..., output)``; the first entry
            must equal ``scale_conv_out_channels[-1] * h_s * w_s`` for the feature maps used.
        channels: accepted for compatibility with the official config dicts; unused (as upstream).

    Defaults are the official constructor's defaults.
    """

    def __init__(
        self,
        in_channels: int = 768,
        upsample_channels: Sequence[int] = (768, 384, 192, 96),
        conv_out_channels: Optional[Sequence[int]] = None,
        conv_kernel_sizes: Optional[Sequence[int]] = None,
        scale_conv_out_channels: Optional[Sequence[int]] = (1536, 512, 128),
        scale_conv_kernel_sizes: Optional[Sequence[int]] = (1, 1, 1),
        scale_final_layer: Optional[Sequence[int]] = (48 * 128, 512, 64, 1),
        channels: int = 16,
    ):
        super().__init__(in_channels, upsample_channels, conv_out_channels, conv_kernel_sizes, instance_norm)
        if scale_conv_out_channels is not None:
            s_ch, s_k = check_pair(
                "scale_conv_out_channels", scale_conv_out_channels, "scale_conv_kernel_sizes", scale_conv_kernel_sizes
            )
            if not s_ch:
                raise ValueError("scale_conv_out_channels must not be empty (pass None to disable the scale branch)")
            widths = check_int_list("scale_final_layer", scale_final_layer)
            if len(widths) < 2:
                raise ValueError(f"scale_final_layer needs at least (in_features, out_features), got {widths}")
            self.scale_conv_kernel_sizes = tuple(s_k)
            # Each scale conv halves the map: stride 2, 'same'-style padding (k - 1) // 2.
            self.scale_conv_layers = conv_stack(in_channels, s_ch, s_k, stride=2)
            self.scale_final_layer = self._mlp(widths)
        else:
            self.scale_conv_kernel_sizes = ()
            self.scale_conv_layers = None
            self.scale_final_layer = None
        self.conv_pointmap = nn.Conv2d(self.out_features, 3, kernel_size=1)
        self.reset_parameters()

    @staticmethod
    def _mlp(widths: Sequence[int]) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:  # no activation on the regressed value
                layers.append(nn.SiLU())
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        init_head_weights(self)

    @staticmethod
    def scale_in_features(
        feature_size: Sequence[int],
        scale_conv_out_channels: Sequence[int] = (1536, 512, 128),
        scale_conv_kernel_sizes: Sequence[int] = (1, 1, 1),
    ) -> int:
        """First ``scale_final_layer`` width for a feature map of ``feature_size`` ``(h, w)``."""
        h, w = check_size("feature_size", feature_size)
        s_ch, s_k = check_pair("scale_conv_out_channels", scale_conv_out_channels, "scale_conv_kernel_sizes", scale_conv_kernel_sizes)
        for k in s_k:
            pad = (k - 1) // 2
            h, w = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
        return s_ch[-1] * h * w

    def _check_scale_input(self, x: Tensor) -> None:
        # Fail before any compute, with the sizes that would fit, instead of a matmul shape error.
        lin = self.scale_final_layer[1]
        s_ch = [m.out_channels for m in self.scale_conv_layers if isinstance(m, nn.Conv2d)]
        got = self.scale_in_features(x.shape[-2:], s_ch, self.scale_conv_kernel_sizes)
        if got != lin.in_features:
            raise ValueError(
                f"x has spatial size {tuple(x.shape[-2:])}, which gives {got} features for the scale "
                f"branch, but scale_final_layer[0] is {lin.in_features}; build the head with "
                f"scale_final_layer[0] = PointmapHead.scale_in_features((h, w), ...) for this size"
            )

    def forward(self, x: FeatureInput) -> tuple[Tensor, Optional[Tensor]]:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns ``(pointmap (B, 3, h * 2**U, w * 2**U), scale (B, 1) or None)``."""
        x = feature_map(x, self.in_channels)
        if self.scale_conv_layers is not None:
            self._check_scale_input(x)
        pointmap = self.conv_pointmap(self.trunk(x))
        scale = None
        if self.scale_conv_layers is not None:
            scale = self.scale_final_layer(self.scale_conv_layers(x))
        return pointmap, scale

    @staticmethod
    def postprocess(pointmap: Tensor, scale: Optional[Tensor] = None, size: Optional[Sequence[int]] = None) -> Tensor:
        """Canonical-camera points ``(B, 3, H, W)`` -> metric points: divide by the per-image
        ``scale`` ``(B, 1)`` (skipped when ``None``), then bilinearly resize to ``size``
        ``(height, width)``."""
        if not isinstance(pointmap, Tensor) or pointmap.ndim != 4 or pointmap.shape[1] != 3:
            raise ValueError("pointmap must be a (B, 3, H, W) tensor")
        if scale is not None:
            if scale.numel() != pointmap.shape[0]:
                raise ValueError(f"scale must hold one value per image (B={pointmap.shape[0]}), got shape {tuple(scale.shape)}")
            pointmap = pointmap / scale.reshape(-1, 1, 1, 1)
        return resize(pointmap, size)
