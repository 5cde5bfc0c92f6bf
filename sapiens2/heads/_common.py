"""Building blocks shared by the task heads.

Every head is a plain ``nn.Module`` tree whose attribute names and ``nn.Sequential`` indices are
chosen so that ``state_dict()`` has exactly the official checkpoint's key names and shapes. The
helpers here therefore always emit the same ``[conv, norm, activation]`` triples in the same order;
norms without parameters (``InstanceNorm2d`` with ``affine=False``) and activations still occupy an
index, which is what keeps e.g. ``conv_layers.3.weight`` pointing at the second convolution.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official heads feed the final-layer map only: their estimators call ``backbone(x)[0]``.
FeatureInput = Union[Tensor, Sequence[Tensor]]

# Transposed-conv kernel -> (padding, output_padding); each choice gives exactly 2x upsampling:
# out = (in - 1) * 2 - 2 * padding + kernel + output_padding = 2 * in.
DECONV_PADDING = {4: (1, 0), 3: (1, 1), 2: (0, 0)}

NormFactory = Callable[[int], nn.Module]


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over the channel axis of a ``(B, C, H, W)`` map, one scale per channel.

    The learnable scale lives in a child ``nn.RMSNorm`` called ``norm`` so the checkpoint key is
    ``<prefix>.norm.weight`` as in the official albedo head.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, H, W, C): rms_norm normalises the trailing dimension. Made contiguous
        # so the reduction runs over a dense last axis, as in the official module (same rounding).
        y = self.norm(x.movedim(1, -1).contiguous())
        return y.movedim(-1, 1).contiguous()


def instance_norm(channels: int) -> nn.Module:
    # affine=False and no running stats: no state-dict entries, statistics always per sample.
    return nn.InstanceNorm2d(channels)


def rms_norm(channels: int) -> nn.Module:
    return ChannelRMSNorm(channels)


def _act() -> nn.Module:
    # In-place is safe: every SiLU follows a norm whose output is not needed for backward.
    return nn.SiLU(inplace=True)


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int_list(name: str, values, allow_empty: bool = True) -> list[int]:
    if values is None:
        values = []
    if isinstance(values, (int, str)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    out = [check_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def check_pair(name_a: str, a, name_b: str, b) -> tuple[list[int], list[int]]:
    """Validate two parallel int sequences (channels and kernel sizes) of equal length."""
    a_list, b_list = check_int_list(name_a, a), check_int_list(name_b, b)
    if len(a_list) != len(b_list):
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {len(a_list)} ({a_list}) "
            f"and {len(b_list)} ({b_list})"
        )
    return a_list, b_list


def deconv_stack(in_channels: int, out_channels: Sequence[int], kernel_sizes: Sequence[int]) -> nn.Module:
    """Transposed convs (stride 2, no bias) + InstanceNorm + SiLU: each step doubles H and W.

    ``nn.Identity`` when ``out_channels`` is empty (no keys, as upstream).
    """
    if not out_channels:
        return nn.Identity()
    layers: list[nn.Module] = []
    for ch, k in zip(out_channels, kernel_sizes):
        if k not in DECONV_PADDING:
            raise ValueError(
                f"deconv_kernel_sizes entries must be one of {sorted(DECONV_PADDING)}, got {k}"
            )
        pad, out_pad = DECONV_PADDING[k]
        # No bias: the InstanceNorm right after subtracts the per-channel mean anyway.
        layers += [
            nn.ConvTranspose2d(in_channels, ch, k, stride=2, padding=pad, output_padding=out_pad, bias=False),
            instance_norm(ch),
            _act(),
        ]
        in_channels = ch
    return nn.Sequential(*layers)


def conv_stack(
    in_channels: int,
    out_channels: Sequence[int],
    kernel_sizes: Sequence[int],
    norm: NormFactory = instance_norm,
    stride: int = 1,
    empty: Optional[Callable[[], nn.Module]] = nn.Identity,
) -> nn.Module:
    """``[Conv2d(k, 'same'-style padding, bias) , norm, SiLU]`` per entry, in one ``nn.Sequential``."""
    if not out_channels:
        return empty()
    layers: list[nn.Module] = []
    for ch, k in zip(out_channels, kernel_sizes):
        layers += [nn.Conv2d(in_channels, ch, k, stride=stride, padding=(k - 1) // 2), norm(ch), _act()]
        in_channels = ch
    return nn.Sequential(*layers)


def pixel_shuffle_stack(in_channels: int, out_channels: Sequence[int], norm: NormFactory) -> nn.Sequential:
    """One block per entry: 3x3 conv to ``4 * out`` channels, PixelShuffle(2) (2x H and W), norm, SiLU.

    Sub-pixel upsampling instead of transposed convs avoids checkerboard artefacts in dense,
    continuous-valued outputs (normals, points, albedo, alpha).
    """
    blocks = []
    for ch in out_channels:
        blocks.append(
            nn.Sequential(nn.Conv2d(in_channels, ch * 4, 3, padding=1), nn.PixelShuffle(2), norm(ch), _act())
        )
        in_channels = ch
    return nn.Sequential(*blocks)


def input_block(channels: int, norm: NormFactory) -> nn.Sequential:
    """3x3 conv C -> C, norm, SiLU: re-mixes the (final-normed) ViT tokens spatially before upsampling."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm(channels), _act())


@torch.no_grad()
def init_head_weights(module: nn.Module, conv_types: tuple[type, ...] = (nn.Conv2d,)) -> None:
    """Fresh-head initialisation matching the official recipe (so fine-tuning from scratch behaves
    the same): Kaiming-normal (fan_out, ReLU gain) for the conv types given, Kaiming-normal (fan_in,
    linear gain) for ``nn.Linear``, zero biases. Types not listed keep PyTorch's default init (the
    official seg head, for instance, leaves its transposed convs at the default)."""
    for m in module.modules():
        if isinstance(m, conv_types):
            _kaiming(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            _kaiming(m.weight, mode="fan_in", nonlinearity="linear")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _kaiming(weight: Tensor, mode: str, nonlinearity: str) -> None:
    if weight.device.type == "meta":
        return
    # Draw in float32 so a bf16/fp16 head gets the same distribution, then cast back.
    w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    nn.init.kaiming_normal_(w, mode=mode, nonlinearity=nonlinearity)
    weight.copy_(w.to(weight.dtype))


def feature_map(x: FeatureInput, in_channels: int, name: str = "x") -> Tensor:
    """Normalise the head input to one ``(B, C, H, W)`` tensor and validate it.

    Accepts the tensor itself (``Sapiens2Backbone(out_type="featmap")``) or a tuple/list whose
    first element is the final-layer map (the official backbone's return convention).
    """
    if isinstance(x, (tuple, list)):
        if not x:
            raise ValueError(f"{name} is an empty {type(x).__name__}; expected a (B, C, H, W) feature map")
        x = x[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor (B, C, H, W) or a tuple/list of them, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, the head expects in_channels={in_channels}")
    return x


def check_size(name: str, size) -> tuple[int, int]:
    if size is None or len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {size!r}")
    return check_int(f"{name}[0]", int(size[0])), check_int(f"{name}[1]", int(size[1]))


def resize(x: Tensor, size: Optional[Sequence[int]]) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialias), the official demos' choice."""
    if size is None:
        return x
    size = check_size("size", size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SubPixelTrunk(nn.Module):
    """Shared trunk of the dense regression heads (normal, pointmap, albedo, matting).

    ``input_conv`` (3x3 C -> C, norm, SiLU), then ``upsample_blocks`` (one PixelShuffle x2 block per
    entry of ``upsample_channels``), then optional ``conv_layers`` (conv, norm, SiLU). Subclasses add
    their 1x1 output conv; ``self.out_features`` is the channel count it must take.
    """

    def __init__(
        self,
        in_channels: int,
        upsample_channels: Sequence[int],
        conv_out_channels: Optional[Sequence[int]],
        conv_kernel_sizes: Optional[Sequence[int]],
        norm: NormFactory,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        up = check_int_list("upsample_channels", upsample_channels)
        conv_ch, conv_k = check_pair("conv_out_channels", conv_out_channels, "conv_kernel_sizes", conv_kernel_sizes)
        self.upsample_factor = 2 ** len(up)
        self.input_conv = input_block(in_channels, norm)
        self.upsample_blocks = pixel_shuffle_stack(in_channels, up, norm)
        ch = up[-1] if up else in_channels
        self.conv_layers = conv_stack(ch, conv_ch, conv_k, norm=norm, empty=nn.Sequential)
        self.out_features = conv_ch[-1] if conv_ch else ch

    def trunk(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, out_features, h * 2**U, w * 2**U)``."""
        return self.conv_layers(self.upsample_blocks(self.input_conv(x)))
