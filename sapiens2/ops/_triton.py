"""Adapters from the custom ops' contracts to the Triton launchers in ``sapiens2.kernels``.

The launchers take contiguous tensors with rows flattened; these adapters reshape (a view when
the input is already contiguous, otherwise one documented copy) and restore the op's shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import qk_norm_rope as _qk
from ..kernels import rms_norm as _rn
from ..kernels import swiglu as _sw


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x, weight, eps):
    y, rstd = _rn.rms_norm_fwd(_rows(x), weight.contiguous(), eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_backward(dy, x, weight, rstd):
    dx, dw = _rn.rms_norm_bwd(_rows(dy), _rows(x), weight.contiguous(), rstd.reshape(-1).contiguous())
    return dx.view(x.shape), dw


def add_rms_norm(x, residual, x_scale, weight, eps):
    xs = None if x_scale is None else x_scale.contiguous()
    y, h, rstd = _rn.add_rms_norm_fwd(_rows(x), _rows(residual), xs, weight.contiguous(), eps)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


def add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd):
    xs = None if x_scale is None else x_scale.contiguous()
    dx, dres, dw, dxs = _rn.add_rms_norm_bwd(
        _rows(dy), None if dh is None else _rows(dh), _rows(x), _rows(h), xs, weight.contiguous(),
        rstd.reshape(-1).contiguous(),
    )
    if x_scale is None:  # dx == dresidual: the op returns it once
        return dres.view(h.shape), x.new_empty(0), dw, x.new_empty(0)
    return dres.view(h.shape), dx.view(x.shape), dw, dxs


def swiglu(x12):
    y = _sw.swiglu_fwd(_rows(x12))
    return y.view(*x12.shape[:-1], x12.shape[-1] // 2)


def swiglu_backward(dy, x12):
    return _sw.swiglu_bwd(_rows(dy), _rows(x12)).view(x12.shape)


def _rope_args(q: Tensor, sin, cos, p: int):
    if sin is None:  # norm only: every token counts as a prefix token (none rotated)
        dummy = torch.zeros(1, q.shape[-1], device=q.device, dtype=torch.float32)
        return dummy, dummy, q.shape[1]
    return sin.contiguous(), cos.contiguous(), p


def qk_norm_rope(q, k, q_weight, k_weight, sin, cos, p, eps):
    sin, cos, p = _rope_args(q, sin, cos, p)
    return _qk.qk_norm_rope_fwd(q.contiguous(), k.contiguous(), q_weight.contiguous(), k_weight.contiguous(),
                                sin, cos, p, eps)


def qk_norm_rope_backward(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, p):
    sin, cos, p = _rope_args(q, sin, cos, p)
    return _qk.qk_norm_rope_bwd(dq.contiguous(), dk.contiguous(), q.contiguous(), k.contiguous(),
                                q_weight.contiguous(), k_weight.contiguous(), sin, cos,
                                q_rstd.contiguous(), k_rstd.contiguous(), p)
