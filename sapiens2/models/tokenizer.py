"""The 4K window tokenizer: local attention inside each ``w x w`` window of patch tokens plus a
learned CLS token; the CLS output becomes the window's single token for the trunk.

Differences from the official implementation (same outputs for the same weights):

* no permute copy of the token grid: ``sapiens2.ops.window_attention`` finds each window's tokens
  by index arithmetic in the grid layout;
* the last layer computes only what is kept — the CLS row: ``sapiens2.ops.cls_pool`` (one query
  per window), and the output projection and FFN on one token per window;
* q, k and v come from one GEMM over the concatenated weights (its input read once) and are
  consumed packed (``window_attention_projected`` / ``cls_pool_kv``): the backward gets the packed
  gradient (one GEMM for the input gradient, no split or scatter copies), the q/k/v bias gradient
  from the attention kernel's own partial sums, and the tokens' and CLS rows' weight gradients
  accumulated in one GEMM;
* MAE masking: with ``layout="windows"`` only the gathered visible windows are computed at all;
* in training the whole stage is recomputed in backward (activation checkpointing, as the official
  code does per chunk), so it keeps only its input for backward: at 4K its activations would
  otherwise be ~60x the official's 0.16 GB per image. Since the FFNs' forward is then a recompute
  anyway, they keep their hidden activation until the backward uses it (``keep_hidden``) rather
  than recomputing it a second time.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .layers import Block, settle


class _AddContiguous(torch.autograd.Function):
    """``x + pos`` written contiguous whatever x's strides, in the one add kernel. The patch embedding's
    ``(B, L, C)`` output is a channel-strided view of the conv output: the kernels and the norms read
    whole rows (a copy otherwise), and a norm over a strided row rounds differently from the official
    code's, which normalises contiguous window rows. Backward: dx is the gradient itself, dpos its sum
    over the broadcast dimensions (what autograd's add does)."""

    @staticmethod
    def forward(ctx, x, pos):
        ctx.pos_shape = pos.shape
        out = x.new_empty(x.shape)
        torch.add(x, pos, out=out)
        return out

    @staticmethod
    def backward(ctx, g):
        lead = g.dim() - len(ctx.pos_shape)  # broadcasting aligns trailing dimensions
        dims = list(range(lead)) + [lead + i for i, n in enumerate(ctx.pos_shape) if n == 1 and g.shape[lead + i] != 1]
        return g, g.sum(dims).reshape(ctx.pos_shape) if ctx.needs_input_grad[1] else None


class WindowTokenizer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, window: int = 4, ffn_ratio: int = 4,
                 checkpoint: bool = True):
        super().__init__()
        self.checkpoint = checkpoint
        self.window = window
        self.num_heads = num_heads
        self.local_pos_embed = nn.Parameter(torch.zeros(1, 1 + window * window, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, num_heads, dim * ffn_ratio, qk_norm=False, layer_scale=None)
            for _ in range(num_layers)
        )
        self.w_cls = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor, grid_hw: tuple[int, int], layout: str = "grid") -> Tensor:
        """``x``: patch tokens ``(B, H*W, C)`` in grid order, or ``(B, K*w*w, C)`` of K gathered windows
        (``layout="windows"``). Returns one token per window ``(B, nW or K, C)`` in window order."""
        # The position add runs outside the checkpoint: its output replaces x as the one tensor
        # kept for backward (same size), and it is not recomputed.
        t = self._add_position(x, grid_hw, layout)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._layers, t, grid_hw, layout, use_reentrant=False)
        return self._layers(t, grid_hw, layout)

    def _add_position(self, x: Tensor, grid_hw: tuple[int, int], layout: str) -> Tensor:
        B, L, C = x.shape
        w = self.window
        gh, gw = grid_hw
        pos = self.local_pos_embed[0, 1:]
        if layout == "grid":
            shape, pos = (B, gh // w, w, gw // w, w, C), pos.view(1, 1, w, 1, w, C)
        else:
            shape = (B, L // (w * w), w * w, C)
        return _AddContiguous.apply(x.reshape(shape), pos).view(B, L, C)

    def _layers(self, t: Tensor, grid_hw: tuple[int, int], layout: str) -> Tensor:
        B, L, C = t.shape
        w = self.window
        nW = L // (w * w)
        c = (self.w_cls[0] + self.local_pos_embed[0, :1]).expand(B, nW, C)

        t_pend = c_pend = None
        last = len(self.blocks) - 1
        H = self.num_heads
        for i, blk in enumerate(self.blocks):
            yt, t = blk.ln1(t_pend, residual=t) if t_pend is not None else blk.ln1(t)
            yc, c = blk.ln1(c_pend, residual=c) if c_pend is not None else blk.ln1(c)
            attn = blk.attn
            # q, k, v from one GEMM each for the tokens and the CLS rows, consumed packed
            w_qkv, b_qkv = attn.packed_qkv_weight()
            if i < last:
                ot, oc = ops.window_attention_projected(yt, w_qkv, b_qkv, H, grid_hw, w, prefix_x=yc,
                                                        layout=layout)
                yt, t = blk.ln2(attn.proj(ot.flatten(2)), residual=t)
                yc, c = blk.ln2(attn.proj(oc.flatten(2)), residual=c)
                # tokens and CLS rows through one FFN call: weight gradients accumulate GEMM into GEMM
                t_pend, c_pend = blk.ffn(yt, keep_hidden=self.checkpoint, x_b=yc)
            else:  # only the CLS rows survive the last layer: the tokens need k and v only
                qkv_c = F.linear(yc, w_qkv, b_qkv).view(B, nW, 3, H, -1)
                kv_t = F.linear(yt, w_qkv[C:], None if b_qkv is None else b_qkv[C:]).view(B, L, 2, H, -1)
                oc = ops.cls_pool_kv(qkv_c, kv_t, grid_hw, w, layout=layout)
                yc, c = blk.ln2(attn.proj(oc.flatten(2)), residual=c)
                c_pend = blk.ffn(yc, keep_hidden=self.checkpoint)
        return settle(c, c_pend)
