"""RMSNorm, and residual add (+ LayerScale) + RMSNorm, as single dispatched ops.

Forward::

    rstd = 1 / sqrt(mean(x^2) + eps)          (fp32, per row; the only thing saved besides inputs)
    y    = x * rstd * w

Backward (xhat = x * rstd, g = dy * w)::

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows(dy * xhat)

With a residual: ``h = residual + x_scale * x`` and ``y = rmsnorm(h) * w``; both ``y`` and ``h``
are returned (``h`` is the residual stream the next block adds to). Its backward takes the
incoming gradient of ``h`` as well: ``gh = dh + dx_norm(h)``, ``dresidual = gh``,
``dx = gh * x_scale``, ``dx_scale = sum_rows(gh * x)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from ._checks import check_float, check_same_device, check_shape, stat_dtype

# ----------------------------------------------------------------------------------------------
# reference implementations (the definition)


def _rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    acc = stat_dtype(x)
    rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1) + eps)
    if weight.dtype == x.dtype:
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)  # exactly what nn.RMSNorm computes
    else:
        y = (x.to(acc) * rstd[..., None] * weight.to(acc)).to(x.dtype)
    return y, rstd


def _rms_norm_bwd_ref(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    acc = stat_dtype(x)
    r = rstd[..., None].to(acc)
    xhat = x.to(acc) * r
    g = dy.to(acc) * weight.to(acc)
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dy.to(acc) * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _add_ref(x: Tensor, residual: Tensor, x_scale: Optional[Tensor]) -> Tensor:
    # Same two roundings as the official `x + gamma(out)`.
    return residual + (x * x_scale if x_scale is not None else x)


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("sapiens2::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    impl = backend.select("rms_norm", x)
    if impl == "reference":
        return _rms_norm_ref(x, weight, eps)
    return impl(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=stat_dtype(x))


@torch.library.custom_op("sapiens2::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    impl = backend.select("rms_norm_backward", x)
    if impl == "reference":
        return _rms_norm_bwd_ref(dy, x, weight, rstd)
    return impl(dy, x, weight, rstd)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_autograd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dw = torch.ops.sapiens2.rms_norm_backward(dy, x, weight, rstd)
    return dx, dw, None


backend.register_autograd("sapiens2::rms_norm", _rms_norm_autograd, setup_context=_rms_norm_setup)


@torch.library.custom_op("sapiens2::add_rms_norm", mutates_args=())
def _add_rms_norm(
    x: Tensor, residual: Tensor, x_scale: Optional[Tensor], weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    impl = backend.select("add_rms_norm", x)
    if impl == "reference":
        h = _add_ref(x, residual, x_scale)
        y, rstd = _rms_norm_ref(h, weight, eps)
        return y, h, rstd
    return impl(x, residual, x_scale, weight, eps)


@_add_rms_norm.register_fake
def _(x, residual, x_scale, weight, eps):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=stat_dtype(x))


@torch.library.custom_op("sapiens2::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward(
    dy: Tensor,
    dh: Optional[Tensor],
    x: Tensor,
    h: Tensor,
    x_scale: Optional[Tensor],
    weight: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dresidual, dx, dweight, dx_scale); dx and dx_scale are empty when x_scale is None
    (then dx equals dresidual, which the caller reuses instead of a copy)."""
    impl = backend.select("add_rms_norm_backward", x)
    if impl != "reference":
        return impl(dy, dh, x, h, x_scale, weight, rstd)
    gh, dw = _rms_norm_bwd_ref(dy, h, weight, rstd)
    acc = stat_dtype(x)
    gh = gh.to(acc) + (dh.to(acc) if dh is not None else 0.0)
    if x_scale is None:
        return gh.to(h.dtype), x.new_empty(0), dw, x.new_empty(0)
    dx = (gh * x_scale.to(acc)).to(x.dtype)
    dxs = (gh * x.to(acc)).reshape(-1, x.shape[-1]).sum(0).to(x_scale.dtype)
    return gh.to(h.dtype), dx, dw, dxs


@_add_rms_norm_backward.register_fake
def _(dy, dh, x, h, x_scale, weight, rstd):
    if x_scale is None:
        return torch.empty_like(h), x.new_empty(0), torch.empty_like(weight), x.new_empty(0)
    return torch.empty_like(h), torch.empty_like(x), torch.empty_like(weight), torch.empty_like(x_scale)


def _add_rms_norm_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    x, residual, x_scale, weight, _ = inputs
    _, h, rstd = output
    ctx.has_scale = x_scale is not None
    # x is read by the backward only for the x_scale gradient: without a scale it is not kept (h stands in
    # for it in the backward call, which reads neither)
    ctx.save_for_backward(x if ctx.has_scale else None, h, x_scale, weight, rstd)


def _add_rms_norm_autograd(ctx, dy, dh, _drstd):
    x, h, x_scale, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dres, dx, dw, dxs = torch.ops.sapiens2.add_rms_norm_backward(dy, dh, x if x is not None else h, h, x_scale,
                                                                 weight, rstd)
    if not ctx.has_scale:
        return dres, dres, None, dw, None
    return dx, dres, dxs, dw, None


backend.register_autograd(
    "sapiens2::add_rms_norm", _add_rms_norm_autograd, setup_context=_add_rms_norm_setup
)


# ----------------------------------------------------------------------------------------------
# public API


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    x_scale: Optional[Tensor] = None,
):
    """``rmsnorm(x) * weight``; with ``residual``: ``(rmsnorm(h) * weight, h)``, ``h = residual + x_scale * x``.

    ``x``: ``(..., C)`` floating; ``weight``, ``x_scale``: ``(C,)``; ``residual``: same shape as ``x``.
    """
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (channel) dimension, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_shape("weight", weight, (C,))
    if x_scale is not None:
        if residual is None:
            raise ValueError("x_scale is only used with a residual; pass residual= as well")
        check_float("x_scale", x_scale)
        check_shape("x_scale", x_scale, (C,))
    if residual is not None:
        check_float("residual", residual)
        check_shape("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
    check_same_device(x=x, weight=weight, residual=residual, x_scale=x_scale)
    if residual is None:
        return torch.ops.sapiens2.rms_norm(x, weight, float(eps))[0]
    y, h, _ = torch.ops.sapiens2.add_rms_norm(x, residual, x_scale, weight, float(eps))
    return y, h
