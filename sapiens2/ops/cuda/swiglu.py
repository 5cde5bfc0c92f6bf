"""CUDA adapters for SwiGLU (kernels: ``csrc/kernels/swiglu.cu``).

Same arguments and return values as the Triton adapters in ``sapiens2/ops/_triton.py``; the
bindings take tensors of any rank (rows = all but the last dimension), so no reshaping here.
"""

from __future__ import annotations

import torch

from . import ops


def swiglu(x12):
    return ops().swiglu_fwd(x12.contiguous())


def swiglu_backward(dy, x12):
    return ops().swiglu_bwd(dy.contiguous(), x12.contiguous())


def swiglu_recompute_backward(ds, x12, bias_grad):
    return tuple(ops().swiglu_recompute_bwd(ds.contiguous(), x12.contiguous(), bool(bias_grad)))


def swiglu_bias_backward(ds, x12):
    return tuple(ops().swiglu_bias_bwd(ds.contiguous(), x12.contiguous()))


def register_fakes(ns: str) -> None:
    def half(x12):
        return x12.new_empty(*x12.shape[:-1], x12.shape[-1] // 2)

    @torch.library.register_fake(f"{ns}::swiglu_fwd")
    def _(x12):
        return half(x12)

    @torch.library.register_fake(f"{ns}::swiglu_bwd")
    def _(dy, x12):
        return torch.empty_like(x12)

    @torch.library.register_fake(f"{ns}::swiglu_recompute_bwd")
    def _(ds, x12, bias_grad):
        return half(x12), torch.empty_like(x12), x12.new_empty(x12.shape[-1] if bias_grad else 0)

    @torch.library.register_fake(f"{ns}::swiglu_bias_bwd")
    def _(ds, x12):
        return torch.empty_like(x12), x12.new_empty(x12.shape[-1])
