"""Window attention and CLS pooling on *packed* projections: q, k, v as one tensor.

The tokenizer computes q, k and v with one GEMM over the concatenated weights, which reads its
input once instead of three times; its output ``(B, L, 3*heads*D)`` is viewed as
``qkv (B, L, 3, heads, D)``. These ops take that tensor whole:

* the kernels read q, k, v through row strides (``3*heads*D`` between tokens): no split copy;
* the backward returns one packed gradient ``dqkv`` written slot by slot by the kernel, which is
  exactly the GEMM's output gradient: ``dx = dqkv @ W_qkv`` is one GEMM and no gradient of three
  views has to be scattered back into a zero-filled buffer (what autograd would do with
  ``qkv.unbind(2)`` fed to the unpacked ops).

``window_attention_qkv(qkv, grid_hw, window, prefix_qkv=None, ...)`` equals
``window_attention(*qkv.unbind(2), grid_hw, window, *prefix_qkv.unbind(2), ...)``;
``cls_pool_kv(cls_qkv, kv, ...)`` equals ``cls_pool(*cls_qkv.unbind(2), *kv.unbind(2), ...)``
(the last tokenizer layer needs only k and v of the window tokens). Same layouts, masks and saved
statistics as the unpacked ops (``sapiens2/ops/window_attention.py``), whose reference
implementations define these.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend
from ._checks import check_float, check_same_device, check_shape, stat_dtype
from .window_attention import (
    _check_window_inputs,
    to_windows,
    _cp_flop,
    _num_windows,
    _window_flops,
    check_token_mask,
    cls_pool_bwd_ref,
    cls_pool_ref,
    window_attention_bwd_ref,
    window_attention_ref,
)


def _unpack(t: Optional[Tensor], n: int):
    return (None,) * n if t is None else t.unbind(2)


# ---------------------------------------------------------------------------------------------- window attention


@torch.library.custom_op("sapiens2::window_attention_qkv", mutates_args=())
def _window_attention_qkv(
    qkv: Tensor, prefix_qkv: Optional[Tensor], token_mask: Optional[Tensor],
    grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o, prefix_o, lse) as ``sapiens2::window_attention`` on the unpacked views."""
    q, k, v = qkv.unbind(2)
    pq, pk, pv = _unpack(prefix_qkv, 3)
    impl = backend.select("window_attention", qkv)  # the unpacked kernels read strided views as they are
    if impl == "reference":
        impl = window_attention_ref
    return impl(q, k, v, pq, pk, pv, token_mask, grid_h, grid_w, window, layout, scale)


@_window_attention_qkv.register_fake
def _(qkv, prefix_qkv, token_mask, grid_h, grid_w, window, layout, scale):
    B, L, _, NH, D = qkv.shape
    nW = _num_windows(qkv[:, :, 0], grid_h, grid_w, window, layout)
    P = 1 if prefix_qkv is not None else 0
    po = qkv.new_empty((B, nW, NH, D)) if prefix_qkv is not None else qkv.new_empty(0)
    return qkv.new_empty((B, L, NH, D)), po, qkv.new_empty((B * nW, NH, P + window * window), dtype=stat_dtype(qkv))


def bias_partials_ref(dqkv: Tensor, dprefix_qkv: Optional[Tensor], grid_h: int, grid_w: int, window: int,
                      layout: str) -> Tensor:
    """Per window: column sums of the (rounded) q/k/v gradients over its tokens and its prefix row,
    fp32 ``(B*nW, 3, heads, D)``; summed over windows they are the q/k/v bias gradient."""
    acc = stat_dtype(dqkv)
    slots = []
    for j in range(3):
        s = to_windows(dqkv[:, :, j], grid_h, grid_w, window, layout).to(acc).sum(2)  # (B*nW, heads, D)
        if dprefix_qkv is not None:
            s = s + dprefix_qkv[:, :, j].reshape(s.shape).to(acc)
        slots.append(s)
    return torch.stack(slots, dim=1)


@torch.library.custom_op("sapiens2::window_attention_qkv_backward", mutates_args=())
def _window_attention_qkv_backward(
    do: Tensor, dprefix_o: Optional[Tensor], qkv: Tensor, prefix_qkv: Optional[Tensor],
    token_mask: Optional[Tensor], o: Tensor, prefix_o: Tensor, lse: Tensor,
    grid_h: int, grid_w: int, window: int, layout: str, scale: float, bias_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dqkv, dprefix_qkv, bias_partials): the gradients packed like the inputs (dprefix_qkv
    empty without a prefix) and, with ``bias_grad``, the per-window partial sums of the q/k/v bias
    gradient (``bias_partials_ref``; empty otherwise)."""
    impl = backend.select("window_attention_qkv_backward", qkv)
    if impl != "reference":
        return impl(do, dprefix_o, qkv, prefix_qkv, token_mask, o, prefix_o, lse, grid_h, grid_w, window, layout,
                    scale, bias_grad)
    g = window_attention_bwd_ref(do, dprefix_o, *qkv.unbind(2), *_unpack(prefix_qkv, 3), token_mask, o, prefix_o,
                                 lse, grid_h, grid_w, window, layout, scale)
    dqkv = torch.stack(g[:3], dim=2)
    dpre = torch.stack(g[3:], dim=2) if prefix_qkv is not None else None
    parts = (bias_partials_ref(dqkv, dpre, grid_h, grid_w, window, layout) if bias_grad
             else qkv.new_empty(0, dtype=stat_dtype(qkv)))
    return dqkv, (dpre if dpre is not None else qkv.new_empty(0)), parts


@_window_attention_qkv_backward.register_fake
def _(do, dprefix_o, qkv, prefix_qkv, token_mask, o, prefix_o, lse, grid_h, grid_w, window, layout, scale,
      bias_grad=False):
    B, L, _, NH, D = qkv.shape
    nW = _num_windows(qkv[:, :, 0], grid_h, grid_w, window, layout)
    parts = qkv.new_empty((B * nW, 3, NH, D) if bias_grad else (0,), dtype=stat_dtype(qkv))
    return (torch.empty_like(qkv), (torch.empty_like(prefix_qkv) if prefix_qkv is not None else qkv.new_empty(0)),
            parts)


def _wa_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output (lse) gets no zero-filled gradient kernel
    qkv, pqkv, tm, gh, gw, w, layout, scale = inputs
    ctx.meta = (gh, gw, w, layout, scale)
    ctx.has_prefix = pqkv is not None
    ctx.save_for_backward(qkv, pqkv, tm, output[0], output[1], output[2])


def _wa_autograd(ctx, do, dpo, _dlse):
    qkv, pqkv, tm, o, po, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do  # e.g. only the prefix output was used
    dqkv, dpqkv, _ = torch.ops.sapiens2.window_attention_qkv_backward(
        do, dpo if ctx.has_prefix else None, qkv, pqkv, tm, o, po, lse, *ctx.meta)
    return dqkv, (dpqkv if ctx.has_prefix else None), None, None, None, None, None, None


backend.register_autograd("sapiens2::window_attention_qkv", _wa_autograd, setup_context=_wa_setup)


# ---------------------------------------------------------------------------------------------- cls_pool


@torch.library.custom_op("sapiens2::cls_pool_kv", mutates_args=())
def _cls_pool_kv(
    cls_qkv: Tensor, kv: Tensor, grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (o (B, nW, heads, D), lse) as ``sapiens2::cls_pool`` on the unpacked views."""
    cq, ck, cv = cls_qkv.unbind(2)
    k, v = kv.unbind(2)
    impl = backend.select("cls_pool", cls_qkv)
    if impl == "reference":
        impl = cls_pool_ref
    return impl(cq, ck, cv, k, v, grid_h, grid_w, window, layout, scale)


@_cls_pool_kv.register_fake
def _(cls_qkv, kv, grid_h, grid_w, window, layout, scale):
    B, nW, _, NH, D = cls_qkv.shape
    return cls_qkv.new_empty((B, nW, NH, D)), cls_qkv.new_empty((B * nW, NH, 1), dtype=stat_dtype(cls_qkv))


@torch.library.custom_op("sapiens2::cls_pool_kv_backward", mutates_args=())
def _cls_pool_kv_backward(
    do: Tensor, cls_qkv: Tensor, kv: Tensor, o: Tensor, lse: Tensor,
    grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (dcls_qkv, dkv) packed like the inputs."""
    impl = backend.select("cls_pool_kv_backward", cls_qkv)
    if impl != "reference":
        return impl(do, cls_qkv, kv, o, lse, grid_h, grid_w, window, layout, scale)
    g = cls_pool_bwd_ref(do, *cls_qkv.unbind(2), *kv.unbind(2), o, lse, grid_h, grid_w, window, layout, scale)
    return torch.stack(g[:3], dim=2), torch.stack(g[3:], dim=2)


@_cls_pool_kv_backward.register_fake
def _(do, cls_qkv, kv, o, lse, grid_h, grid_w, window, layout, scale):
    return torch.empty_like(cls_qkv), torch.empty_like(kv)


def _cp_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    cqkv, kv, gh, gw, w, layout, scale = inputs
    ctx.meta = (gh, gw, w, layout, scale)
    ctx.save_for_backward(cqkv, kv, output[0], output[1])


def _cp_autograd(ctx, do, _dlse):
    cqkv, kv, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dcqkv, dkv = torch.ops.sapiens2.cls_pool_kv_backward(do, cqkv, kv, o, lse, *ctx.meta)
    return dcqkv, dkv, None, None, None, None, None


backend.register_autograd("sapiens2::cls_pool_kv", _cp_autograd, setup_context=_cp_setup)


# ---------------------------------------------------------------------------------------------- FLOPs


@register_flop_formula(torch.ops.sapiens2.window_attention_qkv, get_raw=True)
def _wa_flop(qkv, prefix_qkv, token_mask, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _window_flops(qkv[:, :, 0], None if prefix_qkv is None else prefix_qkv[:, :, 0], window)


@register_flop_formula(torch.ops.sapiens2.window_attention_qkv_backward, get_raw=True)
def _wa_bwd_flop(do, dpo, qkv, prefix_qkv, tm, o, po, lse, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _window_flops(qkv[:, :, 0], None if prefix_qkv is None else prefix_qkv[:, :, 0], window) // 2 * 5


@register_flop_formula(torch.ops.sapiens2.cls_pool_kv, get_raw=True)
def _cp_kv_flop(cls_qkv, kv, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _cp_flop(cls_qkv[:, :, 0], None, None, None, None, grid_h, grid_w, window)


@register_flop_formula(torch.ops.sapiens2.cls_pool_kv_backward, get_raw=True)
def _cp_kv_bwd_flop(do, cls_qkv, kv, o, lse, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _cp_flop(cls_qkv[:, :, 0], None, None, None, None, grid_h, grid_w, window) // 2 * 5


# ---------------------------------------------------------------------------------------------- public API


def _check_packed(name: str, t: Tensor, slots: int) -> None:
    check_float(name, t)
    if t.dim() != 5 or t.shape[2] != slots:
        what = "(B, tokens, 3, heads, D)" if slots == 3 else "(B, tokens, 2, heads, D)"
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def window_attention_qkv(
    qkv: Tensor, grid_hw: tuple[int, int], window: int, prefix_qkv: Optional[Tensor] = None,
    layout: str = "grid", token_mask: Optional[Tensor] = None, scale: Optional[float] = None,
):
    """``window_attention`` on packed ``qkv (B, L, 3, heads, D)`` (and ``prefix_qkv (B, nW, 3, heads,
    D)``); returns ``o`` or ``(o, prefix_o)``. Gradients flow back packed, with no split copy."""
    gh, gw = check_window_attention_qkv(qkv, grid_hw, window, prefix_qkv, layout, token_mask)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    o, po, _ = torch.ops.sapiens2.window_attention_qkv(qkv, prefix_qkv, token_mask, gh, gw, window, layout, scale)
    return (o, po) if prefix_qkv is not None else o


def check_window_attention_qkv(qkv, grid_hw, window, prefix_qkv=None, layout="grid", token_mask=None):
    """Validate the packed op's arguments (clear errors naming them); returns the grid ``(gh, gw)``."""
    _check_packed("qkv", qkv, 3)
    q = qkv[:, :, 0]
    B, nW, gh, gw = _check_window_inputs(q, q, q, grid_hw, window, layout)
    if prefix_qkv is not None:
        _check_packed("prefix_qkv", prefix_qkv, 3)
        check_shape("prefix_qkv", prefix_qkv, (B, nW, 3, qkv.shape[3], qkv.shape[4]))
        if prefix_qkv.dtype != qkv.dtype:
            raise TypeError(f"prefix_qkv has dtype {prefix_qkv.dtype} but qkv has {qkv.dtype}")
        check_same_device(qkv=qkv, prefix_qkv=prefix_qkv)
    check_token_mask(token_mask, layout, B, gh, gw, qkv)
    return gh, gw


def cls_pool_kv(
    cls_qkv: Tensor, kv: Tensor, grid_hw: tuple[int, int], window: int, layout: str = "grid",
    scale: Optional[float] = None,
) -> Tensor:
    """``cls_pool`` on packed ``cls_qkv (B, nW, 3, heads, D)`` and ``kv (B, L, 2, heads, D)`` ->
    ``(B, nW, heads, D)``."""
    _check_packed("cls_qkv", cls_qkv, 3)
    _check_packed("kv", kv, 2)
    k = kv[:, :, 0]
    B, nW, gh, gw = _check_window_inputs(k, k, k, grid_hw, window, layout)
    check_shape("cls_qkv", cls_qkv, (B, nW, 3, kv.shape[3], kv.shape[4]))
    if cls_qkv.dtype != kv.dtype:
        raise TypeError(f"cls_qkv has dtype {cls_qkv.dtype} but kv has {kv.dtype}")
    check_same_device(cls_qkv=cls_qkv, kv=kv)
    scale = 1.0 / math.sqrt(kv.shape[-1]) if scale is None else float(scale)
    return torch.ops.sapiens2.cls_pool_kv(cls_qkv, kv, gh, gw, window, layout, scale)[0]
