"""CUDA adapters for RMSNorm and residual add + RMSNorm (kernels: ``csrc/kernels/rms_norm.cu``).

Rows wider than the kernels take (12288 elements vectorised; see ``s2_rms_norm_max_width``) go
to the Triton kernels instead, which handle any width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

MAX_WIDTH_VECTORISED = 12288
MAX_WIDTH_SCALAR = 4096


def _fits(x: Tensor) -> bool:
    C = x.shape[-1]
    vec = 4 if x.dtype == torch.float32 else 8
    return C <= (MAX_WIDTH_VECTORISED if C % vec == 0 else MAX_WIDTH_SCALAR)


def _triton():
    from .. import _triton

    return _triton


def _c(t):
    return None if t is None else t.contiguous()


def rms_norm(x, weight, eps):
    if not _fits(x):
        return _triton().rms_norm(x, weight, eps)
    return tuple(ops().rms_norm_fwd(x.contiguous(), weight.contiguous(), eps))


def rms_norm_backward(dy, x, weight, rstd):
    if not _fits(x):
        return _triton().rms_norm_backward(dy, x, weight, rstd)
    return tuple(ops().rms_norm_bwd(dy.contiguous(), x.contiguous(), weight.contiguous(), rstd.contiguous()))


def add_rms_norm(x, residual, x_scale, weight, eps):
    if not _fits(x):
        return _triton().add_rms_norm(x, residual, x_scale, weight, eps)
    return tuple(ops().add_rms_norm_fwd(x.contiguous(), residual.contiguous(), _c(x_scale), weight.contiguous(), eps))


def add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd):
    if not _fits(x):
        return _triton().add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd)
    return tuple(ops().add_rms_norm_bwd(dy.contiguous(), _c(dh), x.contiguous(), h.contiguous(), _c(x_scale),
                                        weight.contiguous(), rstd.contiguous()))


def register_fakes(ns: str) -> None:
    def stat(x):
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x), stat(x)

    @torch.library.register_fake(f"{ns}::add_rms_norm_fwd")
    def _(x, residual, x_scale, weight, eps):
        return torch.empty_like(x), torch.empty_like(x), stat(x)

    @torch.library.register_fake(f"{ns}::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake(f"{ns}::add_rms_norm_bwd")
    def _(dy, dh, x, h, x_scale, weight, rstd):
        if x_scale is None:
            return torch.empty_like(h), h.new_empty(0), torch.empty_like(weight), h.new_empty(0)
        return torch.empty_like(h), torch.empty_like(h), torch.empty_like(weight), torch.empty_like(x_scale)
