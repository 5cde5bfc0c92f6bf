"""The MAE branch: a light decoder that reconstructs pixels, and the normalised-pixel loss.

The encoder computed visible tokens only. The decoder projects them to its own width, scatters them
back to their grid positions, fills the masked positions with one learned mask token, runs a few
transformer blocks over the full grid (the encoder's prefix tokens — CLS and registers — ride along,
as in MAE), and predicts each trunk token's pixels with a Linear whose outputs a PixelShuffle lays
out as the image: sub-pixel upsampling, the paper's artifact-free output layer. With the 4K
tokenizer a trunk token is a window, so one token predicts a ``(patch * window)^2`` pixel square.

The decoder's blocks are the backbone's own ``Block`` (RMSNorm, QK-norm, 2D RoPE over the full grid,
SwiGLU), so they run on the same fused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from ..models.layers import Block, RMSNorm, reset_weights
from ..models.rope import Rope2D


class MAEDecoder(nn.Module):
    """Args: ``encoder_dims``; ``patch_px`` (pixels per trunk token side: patch size, times the
    window with the tokenizer); ``width``, ``depth``, ``num_heads`` of the decoder;
    ``num_prefix_tokens`` of the encoder output (CLS + registers)."""

    def __init__(self, encoder_dims: int, patch_px: int, width: int = 512, depth: int = 8, num_heads: int = 16,
                 num_prefix_tokens: int = 9, in_channels: int = 3, ffn_ratio: int = 4, rope_base: float = 100.0):
        super().__init__()
        if width % num_heads or (width // num_heads) % 4:
            raise ValueError(f"decoder width={width} / num_heads={num_heads} must give a head dim divisible by 4")
        self.patch_px = patch_px
        self.in_channels = in_channels
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dims, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.rope = Rope2D(width // num_heads, rope_base, torch.float32)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, num_heads, width * ffn_ratio, qk_norm=True, layer_scale=None)
            for _ in range(depth)
        )
        self.norm = RMSNorm(width)
        self.pred = nn.Linear(width, in_channels * patch_px * patch_px)
        if self.mask_token.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        reset_weights(self)
        trunc_normal_(self.mask_token, std=0.02)
        self.rope.reset_parameters()

    def forward(self, tokens: Tensor, visible_ids: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """``tokens`` ``(B, P + K, C)``: encoder output of the visible tokens (prefix first);
        ``visible_ids`` ``(B, K)``; returns the reconstruction ``(B, 3, th * patch_px, tw * patch_px)``."""
        th, tw = grid_hw
        P = self.num_prefix_tokens
        x = self.embed(tokens)
        B, _, Wd = x.shape
        full = self.mask_token.to(x.dtype).expand(B, th * tw, Wd)
        full = full.scatter(1, visible_ids[:, :, None].expand(-1, -1, Wd), x[:, P:])
        h, pending = torch.cat([x[:, :P], full], dim=1), None
        sin, cos = self.rope(th, tw)
        rope = (sin.to(x.dtype), cos.to(x.dtype))
        for blk in self.blocks:
            h, pending = blk(h, pending, rope, P)
        y = self.norm(pending, residual=h)[0] if pending is not None else self.norm(h)[0]
        px = self.pred(y[:, P:])  # (B, n, 3 p^2)
        px = px.transpose(1, 2).reshape(B, -1, th, tw)
        return F.pixel_shuffle(px, self.patch_px)


def patchify(images: Tensor, patch_px: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, n, p*p*C)``, MAE's ``nchpwq -> nhwpqc`` order."""
    B, C, H, W = images.shape
    p = patch_px
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def norm_pix_loss(images: Tensor, pred: Tensor, mask: Tensor, patch_px: int, weights: Tensor | None = None,
                  eps: float = 1e-6) -> Tensor:
    """MSE on per-patch normalised pixels over the masked patches only (MAE, ``norm_pix_loss=True``).

    For each patch the target is ``(x - mean) / sqrt(var + eps)`` over its ``p*p*C`` values (unbiased
    variance, as MAE computes it); the per-patch mean squared error is averaged over the patches where
    ``mask`` is true. ``images`` and ``pred`` are image-shaped ``(B, C, H, W)``; ``mask`` ``(B, n)``
    (bool or 0/1); ``weights`` ``(B,)`` optionally drops samples (unreadable images) from the average.
    With one mask ratio per batch every view has the same ``|M|``, so this equals the paper's mean over
    views of per-view means."""
    if images.shape != pred.shape:
        raise ValueError(f"pred must have the images' shape {tuple(images.shape)}, got {tuple(pred.shape)}")
    target = patchify(images.float(), patch_px)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + eps) ** 0.5
    per_patch = (patchify(pred.float(), patch_px) - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    if weights is not None:
        m = m * weights.to(m.dtype)[:, None]
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)
