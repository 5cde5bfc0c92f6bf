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
