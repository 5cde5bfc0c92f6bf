"""Body-part segmentation head (29 classes for the released models).

Layout (``state_dict`` keys)::

    deconv_layers.{3i}.weight   (C_in_i, C_i, k_i, k_i)   ConvTranspose2d, stride 2, no bias
    conv_layers.{3j}.weight     (D_j, D_in_j, k_j, k_j)   Conv2d
    conv_layers.{3j}.bias       (D_j,)
    conv_seg.weight             (num_classes, D_last, 1, 1)
    conv_seg.bias               (num_classes,)

Same skeleton as the pose head, with parameter-free ``InstanceNorm2d`` + SiLU after every layer.
The released configs use four transposed convs, so the logits come out at 16x the feature map,
i.e. the input resolution (1024x768 for a 64x48 map).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ._common import FeatureInput, check_int, check_pair, conv_stack, deconv_stack, feature_map, init_head_weights, resize


class SegHead(nn.Module):
    """Feature map ``(B, in_channels, h, w)`` -> logits ``(B, num_classes, h * 2**L, w * 2**L)``.

    Args:
        in_channels: backbone width.
        deconv_out_channels / deconv_kernel_sizes: stride-2 transposed convs (kernel 4, 3 or 2).
        conv_out_channels / conv_kernel_sizes: optional stride-1 convs after them.
        num_classes: number of classes (29 for the released body-part models).

    Defaults are the official constructor's defaults.
    """

    def __init__(
        self,
        in_channels: int = 768,
        deconv_out_channels: Optional[Sequence[int]] = (256, 256, 256),
        deconv_kernel_sizes: Optional[Sequence[int]] = (4, 4, 4),
        conv_out_channels: Optional[Sequence[int]] = None,
        conv_kernel_sizes: Optional[Sequence[int]] = None,
        num_classes: int = 29,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.num_classes = check_int("num_classes", num_classes)
        deconv_ch, deconv_k = check_pair("deconv_out_channels", deconv_out_channels, "deconv_kernel_sizes", deconv_kernel_sizes)
        conv_ch, conv_k = check_pair("conv_out_channels", conv_out_channels, "conv_kernel_sizes", conv_kernel_sizes)
        self.upsample_factor = 2 ** len(deconv_ch)

        self.deconv_layers = deconv_stack(in_channels, deconv_ch, deconv_k)
        ch = deconv_ch[-1] if deconv_ch else in_channels
        self.conv_layers = conv_stack(ch, conv_ch, conv_k)
        ch = conv_ch[-1] if conv_ch else ch
        self.conv_seg = nn.Conv2d(ch, num_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As upstream: only the plain convs are Kaiming-initialised, transposed convs keep the default.
        init_head_weights(self, (nn.Conv2d,))

    def forward(self, x: FeatureInput) -> Tensor:
        """``x``: ``(B, in_channels, h, w)`` (or a tuple/list, first element used).
        Returns class logits ``(B, num_classes, h * 2**L, w * 2**L)``."""
        x = feature_map(x, self.in_channels)
        return self.conv_seg(self.conv_layers(self.deconv_layers(x)))

    @staticmethod
    def postprocess(logits: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        """Logits ``(B, N, H, W)`` -> labels ``(B, size[0], size[1])`` (int64): bilinear resize of
        the logits to the image size (before the arg-max, so boundaries stay smooth), then arg-max."""
        if not isinstance(logits, Tensor) or logits.ndim != 4:
            raise ValueError("logits must be a 4-D tensor (B, num_classes, H, W)")
        return resize(logits, size).argmax(dim=1)
