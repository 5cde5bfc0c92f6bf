"""The q/k/v projection fused with window attention, for the tokens and their per-window prefix
(CLS) rows, which share the projection weights.

Forward (the same GEMMs, in the same order, as two ``F.linear`` calls and the packed op)::

    qkv   = x  W^T + b  -> (B, L, 3, heads, D);   prefix_qkv = px W^T + b -> (B, nW, 3, heads, D)
    o, po = window_attention_qkv(qkv, prefix_qkv)

Backward, what autograd would do minus three passes over activations::

    dqkv, dpqkv, partials = window_attention_qkv_backward(..., bias_grad=True)
    db  = sum_windows(partials)            (the kernel summed its own gradient tiles: no pass over dqkv)
    dW  = dqkv^T x  (+)=  dpqkv^T px        (one GEMM accumulates into the other: no weight-sized add)
    dx  = dqkv W;   dpx = dpqkv W

Autograd on ``F.linear`` would instead read all of ``dqkv`` (3 x tokens x C) once more for the bias
gradient and add the two weight gradients in a separate kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_float, check_shape
from . import backend, partial_sums  # noqa: F401  (registers sapiens2::partial_sums)
from .window_attention_packed import check_window_attention_qkv


class _ProjectedWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, px, weight, bias, token_mask, num_heads, grid_hw, window, layout, scale):
        backend.remember(ctx)
        B, L, C = x.shape
        D = weight.shape[0] // (3 * num_heads)
        qkv = F.linear(x, weight, bias).view(B, L, 3, num_heads, D)
        pqkv = F.linear(px, weight, bias).view(B, px.shape[1], 3, num_heads, D) if px is not None else None
        gh, gw = grid_hw
        o, po, lse = torch.ops.sapiens2.window_attention_qkv(qkv, pqkv, token_mask, gh, gw, window, layout, scale)
        ctx.meta = (gh, gw, window, layout, scale)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, px, weight, qkv, pqkv, token_mask, o, po, lse)
        return o, po

    @staticmethod
    def backward(ctx, do, dpo):
        with backend.as_in_forward(ctx):
            return _ProjectedWindowAttention._backward(ctx, do, dpo)

    @staticmethod
    def _backward(ctx, do, dpo):
        x, px, weight, qkv, pqkv, tm, o, po, lse = ctx.saved_tensors
        need_x, need_px, need_w, need_b = ctx.needs_input_grad[:4]
        do = torch.zeros_like(o) if do is None else do
        has_prefix = pqkv is not None
        bias_grad = ctx.has_bias and need_b
        dqkv, dpqkv, parts = torch.ops.sapiens2.window_attention_qkv_backward(
            do, dpo if has_prefix else None, qkv, pqkv, tm, o, po, lse, *ctx.meta, bias_grad)
        C3, C = weight.shape
        g = dqkv.reshape(-1, C3)
        pg = dpqkv.reshape(-1, C3) if has_prefix else None
        dx = (g @ weight).view(x.shape) if need_x else None
        dpx = (pg @ weight).view(px.shape) if has_prefix and need_px else None
        dw = None
        if need_w:
            dw = g.t() @ x.reshape(-1, C)
            if has_prefix:
                dw = torch.addmm(dw, pg.t(), px.reshape(-1, C))
        db = torch.ops.sapiens2.partial_sums(parts.reshape(-1, C3), weight.dtype) if bias_grad else None
        return dx, dpx, dw, db, None, None, None, None, None, None


def window_attention_projected(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], num_heads: int, grid_hw: tuple[int, int], window: int,
    prefix_x: Optional[Tensor] = None, layout: str = "grid", token_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
):
    """``window_attention_qkv(x W^T + b, prefix_qkv=prefix_x W^T + b)`` with the fused backward above.

    ``x``: tokens ``(B, L, C)``; ``weight``: ``(3 * heads * D, C)`` (q, k, v rows stacked); ``bias``:
    ``(3 * heads * D,)`` or None; ``prefix_x``: ``(B, nW, C)``. Returns ``o (B, L, heads, D)``, or
    ``(o, prefix_o)`` with a prefix."""
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, tokens, C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C or weight.shape[0] % (3 * num_heads):
        raise ValueError(f"weight must be (3 * heads * D, C={C}) with heads={num_heads}, got {tuple(weight.shape)}")
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
    if prefix_x is not None:
        check_float("prefix_x", prefix_x)
        if prefix_x.dim() != 3 or prefix_x.shape[0] != x.shape[0] or prefix_x.shape[2] != C:
            raise ValueError(f"prefix_x must be (B={x.shape[0]}, windows, C={C}), got {tuple(prefix_x.shape)}")
    D = weight.shape[0] // (3 * num_heads)
    # the packed op's argument checks, on shape-only stand-ins of the projection outputs (no op runs)
    B = x.shape[0]
    qkv = torch.empty(B, x.shape[1], 3, num_heads, D, device="meta", dtype=x.dtype)
    pqkv = (torch.empty(B, prefix_x.shape[1], 3, num_heads, D, device="meta", dtype=x.dtype)
            if prefix_x is not None else None)
    tm = None if token_mask is None else torch.empty(token_mask.shape, device="meta", dtype=token_mask.dtype)
    gh, gw = check_window_attention_qkv(qkv, grid_hw, window, pqkv, layout, tm)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o, po = _ProjectedWindowAttention.apply(x, prefix_x, weight, bias, token_mask, num_heads, (gh, gw), window,
                                            layout, scale)
    return (o, po) if prefix_x is not None else o
