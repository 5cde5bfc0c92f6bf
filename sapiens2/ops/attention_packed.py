"""``attention_qkv``: the attention op on one packed q/k/v projection output.

``qkv: (B, N, H + 2 Hkv, D)`` holds the query heads, then the key heads, then the value heads of each
token (one ``x @ [Wq; Wk; Wv]^T`` GEMM, viewed). The kernels read the three slots through their token
stride (no split copies) and the backward writes one packed gradient ``dqkv`` of the same layout, so
the projection's backward is one GEMM for the input gradient and one for the weight gradient (no
per-slot GEMMs, no gradient adds, no concatenation). Semantics are ``sapiens2.ops.attention``'s on
``q, k, v = qkv.split([H, Hkv, Hkv], dim=2)``; ``Hkv = (qkv.shape[2] - num_heads) / 2``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend, determinism
from ._checks import check_float, stat_dtype
from .attention import (_attention_bwd_ref, _attention_ref, attention_backward_flops, attention_flops,
                        check_attention_options, kernel_limits)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views of the q, k, v slots of a packed ``(B, N, H + 2 Hkv, D)`` tensor."""
    Hkv = (qkv.shape[2] - num_heads) // 2
    return qkv[:, :, :num_heads], qkv[:, :, num_heads:num_heads + Hkv], qkv[:, :, num_heads + Hkv:]


@torch.library.custom_op("sapiens2::attention_qkv", mutates_args=())
def _attention_qkv(
    qkv: Tensor,
    num_heads: int,
    q_norm_weight: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    num_prefix_tokens: int,
    seq_lens: Optional[Tensor],
    scale: float,
    norm_eps: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    q, k, v = split_qkv(qkv, num_heads)
    args = (q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps)
    impl = backend.select("attention", qkv, unsupported=kernel_limits(qkv.shape[-1]))
    if impl == "reference":
        return _attention_ref(*args)
    return impl(*args)


@_attention_qkv.register_fake
def _(qkv, num_heads, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps,
      deterministic=False):
    B, N, _, D = qkv.shape
    return qkv.new_empty((B, N, num_heads, D)), qkv.new_empty((B, num_heads, N), dtype=stat_dtype(qkv))


@torch.library.custom_op("sapiens2::attention_qkv_backward", mutates_args=())
def _attention_qkv_backward(
    do: Tensor,
    qkv: Tensor,
    o: Tensor,
    lse: Tensor,
    num_heads: int,
    q_norm_weight: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    num_prefix_tokens: int,
    seq_lens: Optional[Tensor],
    scale: float,
    norm_eps: float,
    deterministic: bool = False,
    bias_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dqkv packed like qkv, dq_norm_weight, dk_norm_weight, dbias); the norm-weight gradients
    are empty without norms; ``dbias`` ((H + 2 Hkv) * D,) in qkv's dtype is the column sums of dqkv (the
    packed projection's bias gradient) with ``bias_grad``, empty otherwise."""
    q, k, v = split_qkv(qkv, num_heads)
    impl = backend.select("attention_qkv_backward", qkv, unsupported=kernel_limits(qkv.shape[-1]))
    if impl != "reference":
        return impl(do, qkv, o, lse, num_heads, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens,
                    scale, norm_eps, deterministic, bias_grad)
    dq, dk, dv, dqw, dkw = _attention_bwd_ref(do, q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens,
                                              seq_lens, scale, norm_eps, o, lse)
    dqkv = torch.cat([dq.to(qkv.dtype), dk.to(qkv.dtype), dv.to(qkv.dtype)], dim=2)
    acc = stat_dtype(qkv)
    db = (torch.cat([dq.to(acc), dk.to(acc), dv.to(acc)], dim=2).reshape(-1, qkv.shape[2] * qkv.shape[3]).sum(0)
          .to(qkv.dtype) if bias_grad else qkv.new_empty(0))
    return dqkv, dqw, dkw, db


@_attention_qkv_backward.register_fake
def _(do, qkv, o, lse, num_heads, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
      norm_eps, deterministic=False, bias_grad=False):
    db = qkv.new_empty(qkv.shape[2] * qkv.shape[3]) if bias_grad else qkv.new_empty(0)
    if q_norm_weight is None:
        return qkv.new_empty(qkv.shape), qkv.new_empty(0), qkv.new_empty(0), db
    return qkv.new_empty(qkv.shape), torch.empty_like(q_norm_weight), torch.empty_like(k_norm_weight), db


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the unused lse output gets no zero-filled gradient kernel
    qkv, H, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic = inputs
    ctx.meta = (H, p, scale, eps, deterministic)
    ctx.has_norm = qw is not None
    ctx.save_for_backward(qkv, qw, kw, sin, cos, seq_lens, output[0], output[1])


def _autograd(ctx, do, _dlse):
    qkv, qw, kw, sin, cos, seq_lens, o, lse = ctx.saved_tensors
    H, p, scale, eps, deterministic = ctx.meta
    do = torch.zeros_like(o) if do is None else do
    dqkv, dqw, dkw, _ = torch.ops.sapiens2.attention_qkv_backward(do.contiguous(), qkv, o, lse, H, qw, kw, sin, cos,
                                                                  p, seq_lens, scale, eps, deterministic)
    if not ctx.has_norm:
        dqw = dkw = None
    return dqkv, None, dqw, dkw, None, None, None, None, None, None, None


backend.register_autograd("sapiens2::attention_qkv", _autograd, setup_context=_setup)


@register_flop_formula(torch.ops.sapiens2.attention_qkv, get_raw=True)
def _flop(qkv, num_heads, *args, out_val=None, **kwargs) -> int:
    B, N, _, D = qkv.shape
    return attention_flops(B, N, num_heads, D)


@register_flop_formula(torch.ops.sapiens2.attention_qkv_backward, get_raw=True)
def _bwd_flop(do, qkv, o, lse, num_heads, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic=False,
              bias_grad=False, *args, out_val=None, **kwargs) -> int:
    B, N, _, D = qkv.shape
    return attention_backward_flops(B, N, num_heads, D, bool(deterministic))


def attention_qkv(
    qkv: Tensor,
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
    """``attention`` on the slots of a packed ``(B, N, H + 2 Hkv, D)`` projection; returns ``(B, N, H, D)``.
    Keyword arguments as ``sapiens2.ops.attention``."""
    check_float("qkv", qkv)
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be (B, N, heads + 2 * kv_heads, head_dim), got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    B, N, HH, D = qkv.shape
    Hkv2 = HH - num_heads
    if Hkv2 < 2 or Hkv2 % 2 or num_heads % (Hkv2 // 2):
        raise ValueError(f"qkv's {HH} heads must be num_heads={num_heads} query heads plus 2 x kv heads that divide "
                         "them")
    sin, cos, scale = check_attention_options("qkv", qkv, B, N, D, q_norm_weight, k_norm_weight, rope,
                                              num_prefix_tokens, seq_lens, scale, check_values)
    o, _ = torch.ops.sapiens2.attention_qkv(qkv, int(num_heads), q_norm_weight, k_norm_weight, sin, cos,
                                            int(num_prefix_tokens), seq_lens, scale, float(norm_eps),
                                            determinism.resolve(deterministic))
    return o
