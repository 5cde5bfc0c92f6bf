"""Attention inside non-overlapping 2D windows, and CLS-guided window pooling (the 4K tokenizer).

Layouts (``heads``/``D`` last, as the projections produce them):

* ``"grid"``: tokens ``(B, H*W, heads, D)`` in row-major grid order; window membership by index
  arithmetic (window ``(i, j)`` holds rows ``i*w .. i*w+w-1`` and columns ``j*w .. j*w+w-1``).
* ``"windows"``: ``(B, K*w*w, heads, D)``, K gathered windows one after another, each in row-major
  order (what the MAE-masked tokenizer produces).

An optional per-window prefix (the window's CLS token) ``(B, nW or K, heads, D)`` is prepended to
each window's keys/values and queries. ``token_mask`` ``(B, H*W)`` bool (grid layout) drops keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend
from ._checks import check_float, check_same_device, check_shape, stat_dtype
from ._sdpa_ref import sdpa_bwd, sdpa_fwd

LAYOUTS = ("grid", "windows")


def to_windows(x: Tensor, gh: int, gw: int, w: int, layout: str) -> Tensor:
    """``(B, L, heads, D)`` -> ``(B * nW, heads, w*w, D)``."""
    B, L, Hh, D = x.shape
    if layout == "grid":
        x = x.reshape(B, gh // w, w, gw // w, w, Hh, D).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(-1, Hh, w * w, D)
    return x.reshape(B, L // (w * w), w * w, Hh, D).permute(0, 1, 3, 2, 4).reshape(-1, Hh, w * w, D)


def from_windows(x: Tensor, B: int, gh: int, gw: int, w: int, layout: str) -> Tensor:
    """Inverse of ``to_windows``."""
    _, Hh, _, D = x.shape
    if layout == "grid":
        x = x.reshape(B, gh // w, gw // w, Hh, w, w, D).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, gh * gw, Hh, D)
    return x.reshape(B, -1, Hh, w * w, D).permute(0, 1, 3, 2, 4).reshape(B, -1, Hh, D)


def _prefix_windows(p: Tensor) -> Tensor:
    """(B, nW, heads, D) -> (B * nW, heads, 1, D)."""
    return p.reshape(-1, p.shape[2], 1, p.shape[3])


def _window_key_mask(token_mask, prefix: bool, B, gh, gw, w):
    if token_mask is None:
        return None
    m = to_windows(token_mask[:, :, None, None], gh, gw, w, "grid")[:, :, :, 0]  # (B*nW, 1, w*w)
    if prefix:
        m = torch.cat([torch.ones_like(m[..., :1]), m], dim=-1)
    return m[:, :, None, :]  # (B*nW, 1, 1, S)


def _assemble(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout):
    B = q.shape[0]
    qw_, kw_, vw_ = (to_windows(t, gh, gw, w, layout) for t in (q, k, v))
    has_prefix = pq is not None
    if has_prefix:
        qw_ = torch.cat([_prefix_windows(pq), qw_], dim=2)
        kw_ = torch.cat([_prefix_windows(pk), kw_], dim=2)
        vw_ = torch.cat([_prefix_windows(pv), vw_], dim=2)
    return qw_, kw_, vw_, _window_key_mask(token_mask, has_prefix, B, gh, gw, w)


def _split(ow, B, gh, gw, w, layout, has_prefix, nW):
    if has_prefix:
        po = ow[:, :, 0].reshape(B, nW, ow.shape[1], ow.shape[3]).clone()  # its own storage: no aliasing
        return from_windows(ow[:, :, 1:], B, gh, gw, w, layout).contiguous(), po
    return from_windows(ow, B, gh, gw, w, layout).contiguous(), ow.new_empty(0)


def _num_windows(q: Tensor, gh: int, gw: int, w: int, layout: str) -> int:
    return (gh // w) * (gw // w) if layout == "grid" else q.shape[1] // (w * w)


@torch.library.custom_op("sapiens2::window_attention", mutates_args=())
def _window_attention(
    q: Tensor, k: Tensor, v: Tensor,
    prefix_q: Optional[Tensor], prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    token_mask: Optional[Tensor], grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o, prefix_o, lse); prefix_o is empty without a prefix; lse (B*nW, heads, P + w*w)."""
    impl = backend.select("window_attention", q)
    if impl != "reference":
        return impl(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale)
    return window_attention_ref(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout,
                                scale)


def window_attention_ref(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale):
    """The definition of ``sapiens2::window_attention`` (plain PyTorch)."""
    B = q.shape[0]
    qw_, kw_, vw_, mask = _assemble(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout)
    ow, lse = sdpa_fwd(qw_, kw_, vw_, mask, scale)
    o, po = _split(ow, B, grid_h, grid_w, window, layout, prefix_q is not None, _num_windows(q, grid_h, grid_w, window, layout))
    return o, po, lse


@_window_attention.register_fake
def _(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale):
    nW = _num_windows(q, grid_h, grid_w, window, layout)
    P = 1 if prefix_q is not None else 0
    po = torch.empty_like(prefix_q) if prefix_q is not None else q.new_empty(0)
    return torch.empty_like(q), po, q.new_empty((q.shape[0] * nW, q.shape[2], P + window * window), dtype=stat_dtype(q))


@torch.library.custom_op("sapiens2::window_attention_backward", mutates_args=())
def _window_attention_backward(
    do: Tensor, dprefix_o: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    prefix_q: Optional[Tensor], prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    token_mask: Optional[Tensor], o: Tensor, prefix_o: Tensor, lse: Tensor,
    grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dprefix_q, dprefix_k, dprefix_v); the prefix ones empty without a prefix."""
    impl = backend.select("window_attention_backward", q)
    if impl != "reference":
        return impl(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse,
                    grid_h, grid_w, window, layout, scale)
    return window_attention_bwd_ref(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o,
                                    lse, grid_h, grid_w, window, layout, scale)


def window_attention_bwd_ref(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse,
                             grid_h, grid_w, window, layout, scale):
    """The definition of ``sapiens2::window_attention_backward`` (plain PyTorch)."""
    B = q.shape[0]
    has_prefix = prefix_q is not None
    qw_, kw_, vw_, mask = _assemble(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout)
    ow = to_windows(o, grid_h, grid_w, window, layout)
    dow = to_windows(do, grid_h, grid_w, window, layout)
    if has_prefix:
        ow = torch.cat([_prefix_windows(prefix_o), ow], dim=2)
        dp = dprefix_o if dprefix_o is not None else torch.zeros_like(prefix_o)
        dow = torch.cat([_prefix_windows(dp), dow], dim=2)
    dq, dk, dv = sdpa_bwd(dow, qw_, kw_, vw_, ow, lse, mask, scale)
    nW = _num_windows(q, grid_h, grid_w, window, layout)
    outs = []
    for g, ref, pref in ((dq, q, prefix_q), (dk, k, prefix_k), (dv, v, prefix_v)):
        main, pg = _split(g, B, grid_h, grid_w, window, layout, has_prefix, nW)
        outs.append((main.to(ref.dtype), pg.to(pref.dtype) if has_prefix else q.new_empty(0)))
    return outs[0][0], outs[1][0], outs[2][0], outs[0][1], outs[1][1], outs[2][1]


@_window_attention_backward.register_fake
def _(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse, grid_h, grid_w, window, layout, scale):
    if prefix_q is None:
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                q.new_empty(0), q.new_empty(0), q.new_empty(0))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(prefix_q), torch.empty_like(prefix_k), torch.empty_like(prefix_v))


def _wa_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    q, k, v, pq, pk, pv, tm, gh, gw, w, layout, scale = inputs
    ctx.meta = (gh, gw, w, layout, scale)
    ctx.has_prefix = pq is not None
    ctx.save_for_backward(q, k, v, pq, pk, pv, tm, output[0], output[1], output[2])


def _wa_autograd(ctx, do, dpo, _dlse):
    q, k, v, pq, pk, pv, tm, o, po, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do  # e.g. only the prefix output was used
    dq, dk, dv, dpq, dpk, dpv = torch.ops.sapiens2.window_attention_backward(
        do, dpo if ctx.has_prefix else None, q, k, v, pq, pk, pv, tm, o, po, lse, *ctx.meta
    )
    if not ctx.has_prefix:
        dpq = dpk = dpv = None
    return dq, dk, dv, dpq, dpk, dpv, None, None, None, None, None, None


backend.register_autograd("sapiens2::window_attention", _wa_autograd, setup_context=_wa_setup)


# ---------------------------------------------------------------------------------------------- cls_pool


@torch.library.custom_op("sapiens2::cls_pool", mutates_args=())
def _cls_pool(
    cls_q: Tensor, cls_k: Tensor, cls_v: Tensor, k: Tensor, v: Tensor,
    grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (o (B, nW, heads, D), lse (B*nW, heads, 1))."""
    impl = backend.select("cls_pool", cls_q)
    if impl != "reference":
        return impl(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale)
    return cls_pool_ref(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale)


def cls_pool_ref(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale):
    """The definition of ``sapiens2::cls_pool`` (plain PyTorch)."""
    kw_ = torch.cat([_prefix_windows(cls_k), to_windows(k, grid_h, grid_w, window, layout)], dim=2)
    vw_ = torch.cat([_prefix_windows(cls_v), to_windows(v, grid_h, grid_w, window, layout)], dim=2)
    # The official tokenizer attends with all 1 + w*w queries of a window and keeps the CLS row; PyTorch's
    # CPU attention kernel rounds a row differently when called with one query than with 1 + w*w, so
    # the CLS query is padded to the window's query count (zero rows, dropped) to round exactly as it does.
    cq = _prefix_windows(cls_q)
    cq = torch.cat([cq, cq.new_zeros(*cq.shape[:2], kw_.shape[2] - 1, cq.shape[3])], dim=2)
    ow, lse = sdpa_fwd(cq, kw_, vw_, None, scale)
    return ow[:, :, :1].reshape(cls_q.shape).contiguous(), lse[:, :, :1].contiguous()


@_cls_pool.register_fake
def _(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale):
    B, nW, Hh, D = cls_q.shape
    return torch.empty_like(cls_q), cls_q.new_empty((B * nW, Hh, 1), dtype=stat_dtype(cls_q))


@torch.library.custom_op("sapiens2::cls_pool_backward", mutates_args=())
def _cls_pool_backward(
    do: Tensor, cls_q: Tensor, cls_k: Tensor, cls_v: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    grid_h: int, grid_w: int, window: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dcls_q, dcls_k, dcls_v, dk, dv)."""
    impl = backend.select("cls_pool_backward", cls_q)
    if impl != "reference":
        return impl(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale)
    return cls_pool_bwd_ref(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale)


def cls_pool_bwd_ref(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale):
    """The definition of ``sapiens2::cls_pool_backward`` (plain PyTorch)."""
    B = cls_q.shape[0]
    kw_ = torch.cat([_prefix_windows(cls_k), to_windows(k, grid_h, grid_w, window, layout)], dim=2)
    vw_ = torch.cat([_prefix_windows(cls_v), to_windows(v, grid_h, grid_w, window, layout)], dim=2)
    dq, dk, dv = sdpa_bwd(_prefix_windows(do), _prefix_windows(cls_q), kw_, vw_, _prefix_windows(o), lse, None, scale)
    shp = cls_q.shape
    return (
        dq.reshape(shp).to(cls_q.dtype),
        dk[:, :, 0].reshape(shp).to(cls_k.dtype).clone(),  # own storage: must not alias dk below
        dv[:, :, 0].reshape(shp).to(cls_v.dtype).clone(),
        from_windows(dk[:, :, 1:], B, grid_h, grid_w, window, layout).to(k.dtype),
        from_windows(dv[:, :, 1:], B, grid_h, grid_w, window, layout).to(v.dtype),
    )


@_cls_pool_backward.register_fake
def _(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale):
    return (torch.empty_like(cls_q), torch.empty_like(cls_k), torch.empty_like(cls_v),
            torch.empty_like(k), torch.empty_like(v))


def _cp_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    cq, ck, cv, k, v, gh, gw, w, layout, scale = inputs
    ctx.meta = (gh, gw, w, layout, scale)
    ctx.save_for_backward(cq, ck, cv, k, v, output[0], output[1])


def _cp_autograd(ctx, do, _dlse):
    cq, ck, cv, k, v, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    grads = torch.ops.sapiens2.cls_pool_backward(do, cq, ck, cv, k, v, o, lse, *ctx.meta)
    return (*grads, None, None, None, None, None)


backend.register_autograd("sapiens2::cls_pool", _cp_autograd, setup_context=_cp_setup)


# ---------------------------------------------------------------------------------------------- FLOPs


def _window_flops(q: Tensor, prefix_q: Optional[Tensor], window: int) -> int:
    B, L, Hh, D = q.shape
    n_prefix = prefix_q.shape[1] if prefix_q is not None else 0
    S = window * window + (1 if n_prefix else 0)
    return 4 * B * Hh * (L + n_prefix) * S * D


@register_flop_formula(torch.ops.sapiens2.window_attention, get_raw=True)
def _wa_flop(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _window_flops(q, prefix_q, window)


@register_flop_formula(torch.ops.sapiens2.window_attention_backward, get_raw=True)
def _wa_bwd_flop(do, dpo, q, k, v, prefix_q, pk, pv, tm, o, po, lse, grid_h, grid_w, window, *args, out_val=None, **kw):
    return _window_flops(q, prefix_q, window) // 2 * 5


@register_flop_formula(torch.ops.sapiens2.cls_pool, get_raw=True)
def _cp_flop(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, *args, out_val=None, **kwargs) -> int:
    B, nW, Hh, D = cls_q.shape
    return 4 * B * Hh * nW * (1 + window * window) * D


@register_flop_formula(torch.ops.sapiens2.cls_pool_backward, get_raw=True)
def _cp_bwd_flop(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, *args, out_val=None, **kwargs) -> int:
    return _cp_flop(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window) // 2 * 5


# ---------------------------------------------------------------------------------------------- public API


def _check_window_inputs(q, k, v, grid_hw, window, layout, prefix=None):
    check_float("q", q)
    check_float("k", k)
    check_float("v", v)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, tokens, heads, D), got shape {tuple(q.shape)}")
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    gh, gw = (int(s) for s in grid_hw)
    if gh % window or gw % window:
        raise ValueError(f"grid_hw {(gh, gw)} must be divisible by window {window}")
    B, L = q.shape[:2]
    if layout == "grid":
        if L != gh * gw:
            raise ValueError(f"grid layout needs {gh}*{gw}={gh * gw} tokens, got {L}")
        nW = (gh // window) * (gw // window)
    else:
        if L % (window * window):
            raise ValueError(f"windows layout needs a multiple of window*window={window * window} tokens, got {L}")
        nW = L // (window * window)
        if nW > (gh // window) * (gw // window):
            raise ValueError(f"{nW} gathered windows but the grid {(gh, gw)} has only {(gh // window) * (gw // window)}")
    return B, nW, gh, gw


def check_token_mask(token_mask, layout, B, gh, gw, ref):
    """``token_mask``: None or bool ``(B, gh*gw)`` on ``ref``'s device, grid layout only."""
    if token_mask is None:
        return
    if layout != "grid":
        raise ValueError("token_mask is only supported with layout='grid'")
    if token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be a bool tensor, got {token_mask.dtype}")
    check_shape("token_mask", token_mask, (B, gh * gw))
    check_same_device(tokens=ref, token_mask=token_mask)


def _check_prefix(name, p, B, nW, q):
    check_float(name, p)
    check_shape(name, p, (B, nW, q.shape[2], q.shape[3]))
    if p.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {p.dtype} but q has {q.dtype}")
    check_same_device(q=q, **{name: p})


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], window: int,
    prefix_q: Optional[Tensor] = None, prefix_k: Optional[Tensor] = None, prefix_v: Optional[Tensor] = None,
    layout: str = "grid", token_mask: Optional[Tensor] = None, scale: Optional[float] = None,
):
    """Attention inside each ``window x window`` window; returns ``o`` or ``(o, prefix_o)`` with a prefix."""
    B, nW, gh, gw = _check_window_inputs(q, k, v, grid_hw, window, layout)
    prefixes = (prefix_q, prefix_k, prefix_v)
    if any(p is not None for p in prefixes) and not all(p is not None for p in prefixes):
        raise ValueError("prefix_q, prefix_k and prefix_v must be given together")
    if prefix_q is not None:
        for name, p in zip(("prefix_q", "prefix_k", "prefix_v"), prefixes):
            _check_prefix(name, p, B, nW, q)
    check_token_mask(token_mask, layout, B, gh, gw, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, po, _ = torch.ops.sapiens2.window_attention(
        q, k, v, prefix_q, prefix_k, prefix_v, token_mask, gh, gw, window, layout, scale
    )
    return (o, po) if prefix_q is not None else o


def cls_pool(
    cls_q: Tensor, cls_k: Tensor, cls_v: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], window: int,
    layout: str = "grid", scale: Optional[float] = None,
) -> Tensor:
    """Each window's CLS query attends its own CLS key/value and the window's tokens -> ``(B, nW, heads, D)``."""
    B, nW, gh, gw = _check_window_inputs(k, k, v, grid_hw, window, layout)
    for name, p in (("cls_q", cls_q), ("cls_k", cls_k), ("cls_v", cls_v)):
        _check_prefix(name, p, B, nW, k)
    scale = 1.0 / math.sqrt(k.shape[-1]) if scale is None else float(scale)
    return torch.ops.sapiens2.cls_pool(cls_q, cls_k, cls_v, k, v, gh, gw, window, layout, scale)[0]
