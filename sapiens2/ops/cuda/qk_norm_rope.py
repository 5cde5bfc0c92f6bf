"""CUDA adapters for per-head QK-RMSNorm + 2D RoPE (kernels: ``csrc/kernels/qk_norm_rope.cu``).

Same arguments and return values as the Triton adapters in ``sapiens2/ops/_triton.py``: ``sin=None``
means the norm only (``num_prefix_tokens`` is then ignored); the tables may be ``(N - p, D)`` or
per sample ``(B, N - p, D)`` of any float dtype and are read in fp32, as the Triton kernels read
them (they are small). The kernels take both norm weights in one dtype (q's or another of
fp32/fp16/bf16); other combinations run on fp32 copies, with the gradients cast back.
"""

from __future__ import annotations

import torch

from . import ops

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tables(sin, cos):
    if sin is None:
        return None, None
    return sin.float().contiguous(), cos.float().contiguous()


def _weights(q_weight, k_weight):
    if q_weight.dtype == k_weight.dtype and q_weight.dtype in _KERNEL_DTYPES:
        return q_weight.contiguous(), k_weight.contiguous()
    return q_weight.float().contiguous(), k_weight.float().contiguous()


def qk_norm_rope(q, k, q_weight, k_weight, sin, cos, p, eps):
    sin, cos = _tables(sin, cos)
    qw, kw = _weights(q_weight, k_weight)
    return tuple(ops().qk_norm_rope_fwd(q.contiguous(), k.contiguous(), qw, kw, sin, cos, int(p), float(eps)))


def qk_norm_rope_backward(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, p):
    sin, cos = _tables(sin, cos)
    qw, kw = _weights(q_weight, k_weight)
    dq_in, dk_in, dqw, dkw = ops().qk_norm_rope_bwd(dq.contiguous(), dk.contiguous(), q.contiguous(), k.contiguous(),
                                                    qw, kw, sin, cos, q_rstd.contiguous(), k_rstd.contiguous(),
                                                    int(p))
    return dq_in, dk_in, dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)


def register_fakes(ns: str) -> None:
    def stat(x):
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::qk_norm_rope_fwd")
    def _(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps):
        return torch.empty_like(q), torch.empty_like(k), stat(q), stat(k)

    @torch.library.register_fake(f"{ns}::qk_norm_rope_bwd")
    def _(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight), torch.empty_like(k_weight)
