"""SwiGLU on the fused ``w12`` projection output: ``silu(a) * b`` with ``a, b = x12.chunk(2, -1)``.

Backward recomputes the sigmoid from the saved input instead of keeping ``silu(a)``::

    s  = sigmoid(a)
    da = dy * b * s * (1 + a * (1 - s))
    db = dy * a * s
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from ._checks import check_float, stat_dtype


def _swiglu_ref(x12: Tensor) -> Tensor:
    a, b = x12.chunk(2, dim=-1)
    return F.silu(a) * b  # the official op sequence


def _swiglu_bwd_ref(dy: Tensor, x12: Tensor) -> Tensor:
    acc = stat_dtype(x12)
    a, b = x12.to(acc).chunk(2, dim=-1)
    s = torch.sigmoid(a)
    g = dy.to(acc)
    da = g * b * s * (1 + a * (1 - s))
    db = g * a * s
    return torch.cat([da, db], dim=-1).to(x12.dtype)


@torch.library.custom_op("sapiens2::swiglu", mutates_args=())
def _swiglu(x12: Tensor) -> Tensor:
    impl = backend.select("swiglu", x12)
    if impl == "reference":
        return _swiglu_ref(x12)
    return impl(x12)


@_swiglu.register_fake
def _(x12):
    return x12.new_empty(*x12.shape[:-1], x12.shape[-1] // 2)


@torch.library.custom_op("sapiens2::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, x12: Tensor) -> Tensor:
    impl = backend.select("swiglu_backward", x12)
    if impl == "reference":
        return _swiglu_bwd_ref(dy, x12)
    return impl(dy, x12)


@_swiglu_backward.register_fake
def _(dy, x12):
    return torch.empty_like(x12)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _autograd(ctx, dy):
    (x12,) = ctx.saved_tensors
    return torch.ops.sapiens2.swiglu_backward(dy, x12)


torch.library.register_autograd("sapiens2::swiglu", _autograd, setup_context=_setup)


def swiglu(x12: Tensor) -> Tensor:
    """``silu(a) * b`` for ``a, b = x12.chunk(2, -1)``; ``x12``: ``(..., 2F)`` -> ``(..., F)``."""
    check_float("x12", x12)
    if x12.dim() < 1 or x12.shape[-1] % 2 or x12.shape[-1] == 0:
        raise ValueError(f"x12 must have an even, non-zero last dimension (a and b halves), got shape {tuple(x12.shape)}")
    return torch.ops.sapiens2.swiglu(x12)


class _SwiGLULinear(torch.autograd.Function):
    """``linear(swiglu(x12), w3, b3)`` keeping only ``x12`` for backward.

    The hidden activation ``s = swiglu(x12)`` (F = 4C per token) would otherwise be kept by the
    linear for its weight gradient; here it is recomputed in backward by the same SwiGLU kernel::

        s = swiglu(x12);  dW3 = dy^T s;  db3 = sum_rows(dy);  dx12 = swiglu_backward(dy W3, x12)
    """

    @staticmethod
    def forward(ctx, x12: Tensor, w3: Tensor, b3):
        ctx.save_for_backward(x12, w3)
        ctx.has_bias = b3 is not None
        return F.linear(torch.ops.sapiens2.swiglu(x12), w3, b3)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x12, w3 = ctx.saved_tensors
        s = torch.ops.sapiens2.swiglu(x12)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw3 = dy2.t() @ s.reshape(-1, s.shape[-1]) if ctx.needs_input_grad[1] else None
        db3 = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx12 = torch.ops.sapiens2.swiglu_backward(dy @ w3, x12) if ctx.needs_input_grad[0] else None
        return dx12, dw3, db3


def swiglu_linear(x12: Tensor, w3: Tensor, b3: "Tensor | None" = None) -> Tensor:
    """``linear(swiglu(x12), w3, b3)`` that recomputes the hidden activation in backward instead of
    keeping it. ``x12``: ``(..., 2F)``; ``w3``: ``(C, F)``; ``b3``: ``(C,)`` or None."""
    check_float("x12", x12)
    check_float("w3", w3)
    if x12.shape[-1] % 2 or w3.dim() != 2 or w3.shape[1] * 2 != x12.shape[-1]:
        raise ValueError(
            f"w3 must be (C, F) with x12 (..., 2F); got x12 {tuple(x12.shape)} and w3 {tuple(w3.shape)}"
        )
    if b3 is not None and tuple(b3.shape) != (w3.shape[0],):
        raise ValueError(f"b3 must have shape ({w3.shape[0]},), got {tuple(b3.shape)}")
    return _SwiGLULinear.apply(x12, w3, b3)
