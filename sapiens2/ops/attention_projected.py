"""``attention_projected``: the packed q/k/v projection and ``attention_qkv`` as one autograd function.

Forward ``qkv = x @ W^T + b`` (one GEMM, viewed ``(B, N, H + 2 Hkv, D)``), then ``attention_qkv``.
Backward: the attention backward returns the packed ``dqkv`` and, from its kernels' per-program
column sums, the bias gradient (no separate full read of ``dqkv`` to sum it, as ``F.linear``'s
backward would do); then ``dx = dqkv W`` and ``dW = dqkv^T x``, one GEMM each.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, determinism
from ._checks import check_float, check_shape
from .attention import check_attention_options
from .attention_packed import attention_qkv, split_qkv  # noqa: F401  (registers the packed ops)


class _ProjectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic):
        backend.remember(ctx)
        B, N, C = x.shape
        D = C // num_heads
        qkv = F.linear(x, weight, bias).view(B, N, weight.shape[0] // D, D)
        o, lse = torch.ops.sapiens2.attention_qkv(qkv, num_heads, qw, kw, sin, cos, p, seq_lens, scale, eps,
                                                  deterministic)
        ctx.meta = (num_heads, p, scale, eps, deterministic, bias is not None)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, qkv, qw, kw, sin, cos, seq_lens, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        with backend.as_in_forward(ctx):
            return _ProjectedAttention._backward(ctx, do)

    @staticmethod
    def _backward(ctx, do):
        x, weight, qkv, qw, kw, sin, cos, seq_lens, o, lse = ctx.saved_tensors
        H, p, scale, eps, deterministic, has_bias = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_norm = qw is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dqkv, dqw, dkw, db = torch.ops.sapiens2.attention_qkv_backward(
            do, qkv, o, lse, H, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic, has_bias and need_b)
        C = x.shape[-1]
        g = dqkv.view(-1, weight.shape[0])
        dx = (g @ weight).view(x.shape) if need_x else None
        dw = g.t() @ x.reshape(-1, C) if need_w else None
        return (dx, dw, db if has_bias and need_b else None, None, dqw if need_norm else None,
                dkw if need_norm else None, None, None, None, None, None, None, None)


def attention_projected(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    num_heads: int,
    *,
    q_norm_weight: Optional[Tensor] = None,
    k_norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-6,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    num_prefix_tokens: int = 0,
    seq_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
    deterministic: Optional[bool] = None,
    check_values: bool = True,
) -> Tensor:
    """``attention_qkv(x @ weight^T + bias)``: ``x (B, N, C)``, ``weight ((H + 2 Hkv) * D, C)`` with
    ``D = C / num_heads``; returns ``(B, N, H, D)``. Keyword arguments as ``sapiens2.ops.attention``."""
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C={C}, got {num_heads!r}")
    D = C // num_heads
    if weight.dim() != 2 or weight.shape[1] != C or weight.shape[0] % D or (weight.shape[0] // D - num_heads) % 2 \
            or weight.shape[0] // D <= num_heads or num_heads % ((weight.shape[0] // D - num_heads) // 2):
        raise ValueError(f"weight must be ((num_heads + 2 * kv_heads) * {D}, {C}) with kv_heads dividing num_heads, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (weight.shape[0],))
    sin, cos, scale = check_attention_options("x", x, B, N, D, q_norm_weight, k_norm_weight, rope, num_prefix_tokens,
                                              seq_lens, scale, check_values)
    return _ProjectedAttention.apply(x, weight, bias, int(num_heads), q_norm_weight, k_norm_weight, sin, cos,
                                     int(num_prefix_tokens), seq_lens, scale, float(norm_eps),
                                     determinism.resolve(deterministic))
