"""Adapters from the custom ops' contracts to the Triton launchers in ``sapiens2.kernels``.

The launchers take contiguous tensors with rows flattened; these adapters reshape (a view when
the input is already contiguous, otherwise one documented copy) and restore the op's shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

import importlib


def _kernels(name: str):
    return importlib.import_module(f"sapiens2.kernels.{name}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x, weight, eps):
    y, rstd = _kernels("rms_norm").rms_norm_fwd(_rows(x), weight.contiguous(), eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_backward(dy, x, weight, rstd):
    dx, dw = _kernels("rms_norm").rms_norm_bwd(_rows(dy), _rows(x), weight.contiguous(), rstd.reshape(-1).contiguous())
    return dx.view(x.shape), dw


def add_rms_norm(x, residual, x_scale, weight, eps):
    xs = None if x_scale is None else x_scale.contiguous()
    y, h, rstd = _kernels("rms_norm").add_rms_norm_fwd(_rows(x), _rows(residual), xs, weight.contiguous(), eps)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


def add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd):
    xs = None if x_scale is None else x_scale.contiguous()
    dx, dres, dw, dxs = _kernels("rms_norm").add_rms_norm_bwd(
        _rows(dy), None if dh is None else _rows(dh), _rows(x), _rows(h), xs, weight.contiguous(),
        rstd.reshape(-1).contiguous(),
    )
    if x_scale is None:  # dx == dresidual: the op returns it once
        return dres.view(h.shape), x.new_empty(0), dw, x.new_empty(0)
    return dres.view(h.shape), dx.view(x.shape), dw, dxs


def swiglu(x12):
    y = _kernels("swiglu").swiglu_fwd(_rows(x12))
    return y.view(*x12.shape[:-1], x12.shape[-1] // 2)


def swiglu_backward(dy, x12):
    return _kernels("swiglu").swiglu_bwd(_rows(dy), _rows(x12)).view(x12.shape)


def swiglu_recompute_backward(ds, x12, bias_grad):
    s, dx12, db = _kernels("swiglu").swiglu_recompute_bwd(_rows(ds), _rows(x12), bias_grad)
    return s.view(*x12.shape[:-1], x12.shape[-1] // 2), dx12.view(x12.shape), db


def swiglu_bias_backward(ds, x12):
    dx12, db = _kernels("swiglu").swiglu_bias_bwd(_rows(ds), _rows(x12))
    return dx12.view(x12.shape), db


def _rope_args(q: Tensor, sin, cos, p: int):
    if sin is None:  # norm only: every token counts as a prefix token (none rotated)
        dummy = torch.zeros(1, q.shape[-1], device=q.device, dtype=torch.float32)
        return dummy, dummy, q.shape[1]
    return sin.contiguous(), cos.contiguous(), p


def qk_norm_rope(q, k, q_weight, k_weight, sin, cos, p, eps):
    sin, cos, p = _rope_args(q, sin, cos, p)
    return _kernels("qk_norm_rope").qk_norm_rope_fwd(q.contiguous(), k.contiguous(), q_weight.contiguous(), k_weight.contiguous(),
                                sin, cos, p, eps)


def qk_norm_rope_backward(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, p):
    sin, cos, p = _rope_args(q, sin, cos, p)
    return _kernels("qk_norm_rope").qk_norm_rope_bwd(dq.contiguous(), dk.contiguous(), q.contiguous(), k.contiguous(),
                                q_weight.contiguous(), k_weight.contiguous(), sin, cos,
                                q_rstd.contiguous(), k_rstd.contiguous(), p)


def partial_sums(part, dtype):
    return _kernels("column_sum").column_sum(part.contiguous()[None], dtype)[0]


def _c(t):
    return None if t is None else t.contiguous()


def _heads(t):
    """A (B, N, heads, D) tensor as the attention kernels take it: as it is when its head rows are
    contiguous and its batch stride is N tokens (e.g. a slot of a packed qkv), else one copy."""
    B, N, H, D = t.shape
    if t.stride(3) == 1 and (H == 1 or t.stride(2) == D) and (B == 1 or t.stride(0) == N * t.stride(1)):
        return t
    return t.contiguous()


def attention(q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps):
    return _kernels("attention").attention_fwd(_heads(q), _heads(k), _heads(v), _c(qw), _c(kw), _c(sin), _c(cos), p,
                                               _c(seq_lens), scale, eps)


def attention_backward(do, q, k, v, o, lse, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic=False):
    return _kernels("attention_bwd").attention_bwd(_c(do), _heads(q), _heads(k), _heads(v), _c(o), _c(lse), _c(qw),
                                                   _c(kw), _c(sin), _c(cos), p, _c(seq_lens), scale, eps,
                                                   deterministic)


def attention_qkv_backward(do, qkv, o, lse, H, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic=False,
                           bias_grad=False):
    """The kernels read q, k, v from their slots of qkv and write dq, dk, dv into the slots of one dqkv
    (and with ``bias_grad`` per-program column sums of them, finished by two column-sum launches)."""
    from .attention_packed import split_qkv

    qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    out = _kernels("attention_bwd").attention_bwd(
        _c(do), *split_qkv(qkv, H), _c(o), _c(lse), _c(qw), _c(kw), _c(sin), _c(cos), p, _c(seq_lens), scale, eps,
        deterministic, grads_out=split_qkv(dqkv, H), bias_grad=bias_grad)
    return dqkv, out[3], out[4], (out[5] if bias_grad else qkv.new_empty(0))


# Window attention / cls_pool: the launchers read q/k/v-like inputs through row strides, so views of
# packed projections pass through without a copy (they make other layouts contiguous themselves).


def window_attention(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale):
    return _kernels("window_attention").window_attention_fwd(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale)


def window_attention_backward(do, dpo, q, k, v, pq, pk, pv, token_mask, o, po, lse, gh, gw, w, layout, scale):
    return _kernels("window_attention").window_attention_bwd(do, dpo, q, k, v, pq, pk, pv, token_mask, o, po, lse,
                                                             gh, gw, w, layout, scale)


def cls_pool(cq, ck, cv, k, v, gh, gw, w, layout, scale):
    return _kernels("window_attention").cls_pool_fwd(cq, ck, cv, k, v, gh, gw, w, layout, scale)


def cls_pool_backward(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale):
    return _kernels("window_attention").cls_pool_bwd(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale)


def window_attention_qkv_backward(do, dpo, qkv, pqkv, token_mask, o, po, lse, gh, gw, w, layout, scale,
                                  bias_grad=False):
    """The kernel writes dq, dk, dv straight into the slots of one packed dqkv (row stride 3*heads*D),
    and with ``bias_grad`` each window's column sums of them (the bias gradient's partials)."""
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    has_prefix = pqkv is not None
    dpre = torch.empty(pqkv.shape, device=qkv.device, dtype=qkv.dtype) if has_prefix else qkv.new_empty(0)
    B, L, _, NH, D = qkv.shape
    nW = lse.shape[0] // B if B else 0
    parts = torch.empty((B * nW, 3, NH, D) if bias_grad else (0,), device=qkv.device, dtype=torch.float32)
    _kernels("window_attention").window_attention_bwd(
        do, dpo, *qkv.unbind(2), *(pqkv.unbind(2) if has_prefix else (None, None, None)), token_mask, o, po, lse,
        gh, gw, w, layout, scale, grads_out=dqkv.unbind(2), prefix_grads_out=dpre.unbind(2) if has_prefix else None,
        bias_partials=parts if bias_grad else None)
    return dqkv, dpre, parts


def cls_pool_kv_backward(do, cqkv, kv, o, lse, gh, gw, w, layout, scale):
    dcqkv = torch.empty(cqkv.shape, device=cqkv.device, dtype=cqkv.dtype)
    dkv = torch.empty(kv.shape, device=kv.device, dtype=kv.dtype)
    _kernels("window_attention").cls_pool_bwd(do, *cqkv.unbind(2), *kv.unbind(2), o, lse, gh, gw, w, layout, scale,
                                              grads_out=dkv.unbind(2), cls_grads_out=dcqkv.unbind(2))
    return dcqkv, dkv
