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
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    ctx.save_for_backward(inputs[0])


def _autograd(ctx, dy):
    (x12,) = ctx.saved_tensors
    return torch.ops.sapiens2.swiglu_backward(dy, x12)


backend.register_autograd("sapiens2::swiglu", _autograd, setup_context=_setup)


def swiglu(x12: Tensor) -> Tensor:
    """``silu(a) * b`` for ``a, b = x12.chunk(2, -1)``; ``x12``: ``(..., 2F)`` -> ``(..., F)``."""
    check_float("x12", x12)
    if x12.dim() < 1 or x12.shape[-1] % 2 or x12.shape[-1] == 0:
        raise ValueError(f"x12 must have an even, non-zero last dimension (a and b halves), got shape {tuple(x12.shape)}")
    return torch.ops.sapiens2.swiglu(x12)


@torch.library.custom_op("sapiens2::swiglu_recompute_backward", mutates_args=())
def _swiglu_recompute_backward(ds: Tensor, x12: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over ``x12`` in the FFN backward: the recomputed hidden ``s = swiglu(x12)`` (for the
    ``w3`` weight gradient), ``dx12`` and, when ``bias_grad``, the ``w12`` bias gradient
    ``sum_rows(dx12)`` (empty otherwise)."""
    impl = backend.select("swiglu_recompute_backward", x12)
    if impl != "reference":
        return impl(ds, x12, bias_grad)
    dx12 = _swiglu_bwd_ref(ds, x12)
    db = dx12.to(stat_dtype(x12)).reshape(-1, x12.shape[-1]).sum(0).to(x12.dtype) if bias_grad else x12.new_empty(0)
    return _swiglu_ref(x12), dx12, db


@_swiglu_recompute_backward.register_fake
def _(ds, x12, bias_grad):
    return (x12.new_empty(*x12.shape[:-1], x12.shape[-1] // 2), torch.empty_like(x12),
            x12.new_empty(x12.shape[-1] if bias_grad else 0))


@torch.library.custom_op("sapiens2::swiglu_bias_backward", mutates_args=())
def _swiglu_bias_backward(ds: Tensor, x12: Tensor) -> tuple[Tensor, Tensor]:
    """``dx12`` and the ``w12`` bias gradient ``sum_rows(dx12)`` in one pass, for a caller that kept
    the hidden activation (no recomputed ``s`` written)."""
    impl = backend.select("swiglu_bias_backward", x12)
    if impl != "reference":
        return impl(ds, x12)
    dx12 = _swiglu_bwd_ref(ds, x12)
    return dx12, dx12.to(stat_dtype(x12)).reshape(-1, x12.shape[-1]).sum(0).to(x12.dtype)


@_swiglu_bias_backward.register_fake
def _(ds, x12):
    return torch.empty_like(x12), x12.new_empty(x12.shape[-1])


class _SwiGLUFFN(torch.autograd.Function):
    """``w3(swiglu(w12(x)))`` keeping only ``x`` and ``x12`` for backward.

    The hidden activation ``s = swiglu(x12)`` (F = 4C per token) is recomputed in backward instead of
    kept, in the same pass that produces ``dx12`` and the ``w12`` bias gradient::

        ds = dy W3;  (s, dx12, db12) = swiglu_recompute_backward(ds, x12)
        dW3 = dy^T s;  db3 = sum_rows(dy);  dW12 = dx12^T x;  dx = dx12 W12

    A second set of rows ``x_b`` sharing the weights (the tokenizer's CLS rows beside its tokens) goes
    through the same function: its weight-gradient GEMMs accumulate into the first set's (``addmm``)
    instead of a separate weight-sized add.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_b, w12: Tensor, b12, w3: Tensor, b3, keep_hidden: bool = False):
        backend.remember(ctx)
        ctx.keep_hidden = keep_hidden
        ctx.biases = (b12 is not None, b3 is not None)
        ctx.has_b = x_b is not None
        saved, outs = [], []
        for xi in (x, x_b) if x_b is not None else (x,):
            x12 = F.linear(xi, w12, b12)
            s = torch.ops.sapiens2.swiglu(x12)
            saved += [xi, x12, s if keep_hidden else None]
            outs.append(F.linear(s, w3, b3))
        if x_b is None:
            saved += [None, None, None]
        ctx.save_for_backward(w12, w3, *saved)
        return outs[0], (outs[1] if x_b is not None else None)

    @staticmethod
    def backward(ctx, dy: Tensor, dy_b):
        with backend.as_in_forward(ctx):
            return _SwiGLUFFN._backward(ctx, dy, dy_b)

    @staticmethod
    def _backward(ctx, dy: Tensor, dy_b):
        w12, w3, *saved = ctx.saved_tensors
        has_b12, has_b3 = ctx.biases
        need = ctx.needs_input_grad  # (x, x_b, w12, b12, w3, b3, keep_hidden)
        bias12 = has_b12 and need[3]
        dxs, dw12, db12, dw3, db3 = [None, None], None, None, None, None
        for i in range(2 if ctx.has_b else 1):
            x, x12, s = saved[3 * i:3 * i + 3]
            g = dy if i == 0 else dy_b
            if g is None:
                continue
            ds = g @ w3
            if ctx.keep_hidden and bias12:  # s kept: dx12 and the bias gradient only
                dx12, db = torch.ops.sapiens2.swiglu_bias_backward(ds, x12)
            elif ctx.keep_hidden:
                dx12, db = torch.ops.sapiens2.swiglu_backward(ds, x12), None
            else:
                s, dx12, db = torch.ops.sapiens2.swiglu_recompute_backward(ds, x12, bias12)
            g2 = g.reshape(-1, g.shape[-1])
            dx12_2 = dx12.reshape(-1, dx12.shape[-1])
            if need[4]:
                s2 = s.reshape(-1, s.shape[-1])
                dw3 = g2.t() @ s2 if dw3 is None else torch.addmm(dw3, g2.t(), s2)
            if need[2]:
                x2 = x.reshape(-1, x.shape[-1])
                dw12 = dx12_2.t() @ x2 if dw12 is None else torch.addmm(dw12, dx12_2.t(), x2)
            if bias12:
                db12 = db if db12 is None else db12 + db
            if has_b3 and need[5]:
                db3 = g2.sum(0) if db3 is None else db3 + g2.sum(0)
            if need[i]:
                dxs[i] = dx12 @ w12
        return dxs[0], dxs[1], dw12, db12, dw3, db3, None


def swiglu_ffn(x: Tensor, w12: Tensor, b12: "Tensor | None", w3: Tensor, b3: "Tensor | None",
               keep_hidden: bool = False, x_b: "Tensor | None" = None):
    """The SwiGLU FFN ``w3(silu(a) * b)``, ``a, b = w12(x).chunk(2, -1)``, with a backward that
    recomputes the hidden activation instead of keeping it. ``x``: ``(..., C)``; ``w12``: ``(2F, C)``;
    ``w3``: ``(C_out, F)``; biases or None.

    ``keep_hidden=True`` keeps ``s = swiglu(x12)`` for backward instead (F more values per token)
    and skips its recompute: right where the forward itself is a recompute (activation
    checkpointing), whose saved tensors live only until the backward consumes them.

    ``x_b``: a second set of rows ``(..., C)`` through the same weights; then ``(y, y_b)`` is returned
    and the weight gradients of both sets are accumulated GEMM into GEMM."""
    for name, t in (("x", x), ("w12", w12), ("w3", w3)):
        check_float(name, t)
    if w12.dim() != 2 or w12.shape[1] != x.shape[-1] or w12.shape[0] % 2:
        raise ValueError(f"w12 must be (2F, C={x.shape[-1]}), got {tuple(w12.shape)}")
    if w3.dim() != 2 or w3.shape[1] * 2 != w12.shape[0]:
        raise ValueError(f"w3 must be (C_out, F={w12.shape[0] // 2}), got {tuple(w3.shape)}")
    if b12 is not None and tuple(b12.shape) != (w12.shape[0],):
        raise ValueError(f"b12 must have shape ({w12.shape[0]},), got {tuple(b12.shape)}")
    if b3 is not None and tuple(b3.shape) != (w3.shape[0],):
        raise ValueError(f"b3 must have shape ({w3.shape[0]},), got {tuple(b3.shape)}")
    if x_b is not None:
        check_float("x_b", x_b)
        if x_b.shape[-1] != x.shape[-1] or x_b.dtype != x.dtype:
            raise ValueError(f"x_b must have x's width {x.shape[-1]} and dtype {x.dtype}, got {tuple(x_b.shape)}, "
                             f"{x_b.dtype}")
        return _SwiGLUFFN.apply(x, x_b, w12, b12, w3, b3, keep_hidden)
    return _SwiGLUFFN.apply(x, None, w12, b12, w3, b3, keep_hidden)[0]
