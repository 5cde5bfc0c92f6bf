"""CUDA adapters for window attention and CLS pooling (kernels: ``csrc/kernels/window_attention.cu``).

Same arguments and return values as the Triton adapters in ``sapiens2/ops/_triton.py``. The kernels
read every ``(B, rows, heads, D)`` input through its batch and row strides, so q, k, v (and do, o)
given as token-strided views of one fused projection output ``(B, L, 3*heads*D)`` are passed as
they are (no copy); only a tensor whose heads and head dim are not contiguous is copied first.
Outputs are new contiguous tensors; the packed backward ops (``window_attention_qkv_backward``,
``cls_pool_kv_backward``) return packed gradients that the kernels write slot by slot through
their output strides (and, with ``bias_grad``, the q/k/v bias gradient's per-window partials).

The kernels take head dims that are a multiple of 4 from 4 to 256 and windows up to 8x8
(``P + w*w <= 65`` rows) whose block fits the device's shared memory (``smem_bytes``, the same
computation as ``s2_window_attention_smem_bytes``: every window up to 4x4 at any of those head dims;
the backward of 8x8 windows with the CLS up to D = 172 on sm_90 and D = 116 on sm_80's 163 KiB,
its forward up to 256 / 212). Other shapes go to the Triton
kernels on GPU tensors, like the RMSNorm adapters' wide rows; under the CPU emulation (tests) the
binding raises its ``ValueError`` naming the head dim / window instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import is_emulated, ops

FWD, BWD, CLS_FWD, CLS_BWD = 0, 1, 2, 3  # kernel ids of s2_window_attention_smem_bytes
MAX_HEAD_DIM = 256
MAX_ROWS = 65


def smem_bytes(kernel: int, window: int, prefix: bool, head_dim: int) -> int:
    """Dynamic shared memory of the smallest block (one window-head) of ``kernel``; mirrors the carving
    in window_attention.cu (16-byte aligned pieces, fp32 tiles of padded rows)."""
    S = window * window + (1 if prefix or kernel in (CLS_FWD, CLS_BWD) else 0)
    D = head_dim
    Dp = D + 4 if (D // 4) % 2 == 0 else D
    Cr, Sr = (D // 4) | 1, S | 1

    def f32(n):
        return (4 * n + 15) // 16 * 16

    tile, rows = f32(S * Dp), f32(S)
    index = f32(S) + 2 * f32(1)  # row positions, unit batch / head (int32)
    if kernel == FWD:
        return 3 * tile + rows + index
    if kernel == BWD:
        return 4 * tile + 2 * f32(S * Sr) + f32(S * Cr) + rows + index
    if kernel == CLS_FWD:
        return tile + f32(Dp) + rows + index
    return 2 * tile + 2 * f32(Dp) + 2 * rows + index


def _smem_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return 227 * 1024  # the emulation models sm_90


def supported(kernel: int, window: int, prefix: bool, head_dim: int, device: torch.device) -> bool:
    """Whether the CUDA kernels take this window / head dim on ``device``."""
    rows = window * window + (1 if prefix or kernel in (CLS_FWD, CLS_BWD) else 0)
    if head_dim % 4 or not 4 <= head_dim <= MAX_HEAD_DIM or rows > MAX_ROWS:
        return False
    return smem_bytes(kernel, window, prefix, head_dim) <= _smem_limit(device)


def _fallback(kernel: int, window: int, prefix: bool, x: Tensor) -> bool:
    """Route shapes the kernels do not take to Triton (GPU tensors); the emulation raises instead."""
    return not is_emulated() and not supported(kernel, window, prefix, x.shape[-1], x.device)


def _triton():
    from .. import _triton

    return _triton


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """A (B, rows, heads, D) input as the kernels take it: as is when heads and D are contiguous
    (any batch / row strides), else a contiguous copy."""
    if t is None:
        return None
    H, D = t.shape[-2], t.shape[-1]
    if t.dim() == 4 and (D <= 1 or t.stride(-1) == 1) and (H <= 1 or t.stride(-2) == D):
        return t
    return t.contiguous()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def window_attention(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale):
    if _fallback(FWD, w, pq is not None, q):
        return _triton().window_attention(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale)
    return tuple(ops().window_attention_fwd(_rows(q), _rows(k), _rows(v), _rows(pq), _rows(pk), _rows(pv),
                                            _c(token_mask), gh, gw, w, layout, scale))


def window_attention_backward(do, dpo, q, k, v, pq, pk, pv, token_mask, o, po, lse, gh, gw, w, layout, scale):
    if _fallback(BWD, w, pq is not None, q):
        return _triton().window_attention_backward(do, dpo, q, k, v, pq, pk, pv, token_mask, o, po, lse, gh, gw, w,
                                                   layout, scale)
    return tuple(ops().window_attention_bwd(_rows(do), _rows(dpo), _rows(q), _rows(k), _rows(v), _rows(pq),
                                            _rows(pk), _rows(pv), _c(token_mask), _rows(o),
                                            _rows(po) if pq is not None else po, lse.contiguous(), gh, gw, w,
                                            layout, scale))


def cls_pool(cq, ck, cv, k, v, gh, gw, w, layout, scale):
    if _fallback(CLS_FWD, w, True, k):
        return _triton().cls_pool(cq, ck, cv, k, v, gh, gw, w, layout, scale)
    return tuple(ops().cls_pool_fwd(_rows(cq), _rows(ck), _rows(cv), _rows(k), _rows(v), gh, gw, w, layout, scale))


def cls_pool_backward(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale):
    if _fallback(CLS_BWD, w, True, k):
        return _triton().cls_pool_backward(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale)
    return tuple(ops().cls_pool_bwd(_rows(do), _rows(cq), _rows(ck), _rows(cv), _rows(k), _rows(v), _rows(o),
                                    lse.contiguous(), gh, gw, w, layout, scale))


def _packed(t: Optional[Tensor]) -> Optional[Tensor]:
    """A packed (B, rows, n, heads, D) input as the kernels take it: as is when heads and D are
    contiguous (any batch / row / slot strides: its slots are read in place), else a contiguous copy."""
    if t is None:
        return None
    H, D = t.shape[-2], t.shape[-1]
    if t.dim() == 5 and (D <= 1 or t.stride(-1) == 1) and (H <= 1 or t.stride(-2) == D):
        return t
    return t.contiguous()


def window_attention_qkv_backward(do, dpo, qkv, pqkv, token_mask, o, po, lse, gh, gw, w, layout, scale,
                                  bias_grad=False):
    """Packed gradients (dqkv, dprefix_qkv, bias_partials): the kernel writes dq, dk, dv straight into
    the slots of one dqkv (output row stride 3*heads*D) and, with ``bias_grad``, each window's fp32
    column sums of them (``bias_partials_ref``)."""
    if _fallback(BWD, w, pqkv is not None, qkv):
        return _triton().window_attention_qkv_backward(do, dpo, qkv, pqkv, token_mask, o, po, lse, gh, gw, w,
                                                       layout, scale, bias_grad)
    return tuple(ops().window_attention_qkv_bwd(_rows(do), _rows(dpo), _packed(qkv), _packed(pqkv), _c(token_mask),
                                                _rows(o), _rows(po) if pqkv is not None else po, lse.contiguous(),
                                                gh, gw, w, layout, scale, bool(bias_grad)))


def cls_pool_kv_backward(do, cqkv, kv, o, lse, gh, gw, w, layout, scale):
    """Packed gradients (dcls_qkv, dkv), written slot by slot by the kernel."""
    if _fallback(CLS_BWD, w, True, kv):
        return _triton().cls_pool_kv_backward(do, cqkv, kv, o, lse, gh, gw, w, layout, scale)
    return tuple(ops().cls_pool_kv_bwd(_rows(do), _packed(cqkv), _packed(kv), _rows(o), lse.contiguous(), gh, gw, w,
                                       layout, scale))


def _num_windows(L: int, gh: int, gw: int, w: int, layout: str) -> int:
    return (gh // w) * (gw // w) if layout == "grid" else L // (w * w)


def register_fakes(ns: str) -> None:
    """Outputs are contiguous whatever the inputs' strides (``new_empty``, not ``empty_like``)."""

    @torch.library.register_fake(f"{ns}::window_attention_fwd")
    def _(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale):
        B, L, H, D = q.shape
        nW = _num_windows(L, gh, gw, w, layout)
        P = 1 if pq is not None else 0
        po = q.new_empty((B, nW, H, D)) if pq is not None else q.new_empty(0)
        return q.new_empty((B, L, H, D)), po, q.new_empty((B * nW, H, P + w * w), dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::window_attention_bwd")
    def _(do, dpo, q, k, v, pq, pk, pv, token_mask, o, po, lse, gh, gw, w, layout, scale):
        B, L, H, D = q.shape
        tok = [q.new_empty((B, L, H, D)) for _ in range(3)]
        if pq is None:
            return (*tok, q.new_empty(0), q.new_empty(0), q.new_empty(0))
        nW = _num_windows(L, gh, gw, w, layout)
        return (*tok, *(q.new_empty((B, nW, H, D)) for _ in range(3)))

    @torch.library.register_fake(f"{ns}::cls_pool_fwd")
    def _(cq, ck, cv, k, v, gh, gw, w, layout, scale):
        B, L, H, D = k.shape
        nW = _num_windows(L, gh, gw, w, layout)
        return k.new_empty((B, nW, H, D)), k.new_empty((B * nW, H, 1), dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::cls_pool_bwd")
    def _(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale):
        B, L, H, D = k.shape
        nW = _num_windows(L, gh, gw, w, layout)
        return (*(k.new_empty((B, nW, H, D)) for _ in range(3)), k.new_empty((B, L, H, D)), k.new_empty((B, L, H, D)))

    @torch.library.register_fake(f"{ns}::window_attention_qkv_bwd")
    def _(do, dpo, qkv, pqkv, token_mask, o, po, lse, gh, gw, w, layout, scale, bias_grad):
        B, L, _, H, D = qkv.shape
        nW = _num_windows(L, gh, gw, w, layout)
        dpre = qkv.new_empty((B, nW, 3, H, D)) if pqkv is not None else qkv.new_empty(0)
        parts = qkv.new_empty((B * nW, 3, H, D) if bias_grad else (0,), dtype=torch.float32)
        return qkv.new_empty((B, L, 3, H, D)), dpre, parts

    @torch.library.register_fake(f"{ns}::cls_pool_kv_bwd")
    def _(do, cqkv, kv, o, lse, gh, gw, w, layout, scale):
        B, L, _, H, D = kv.shape
        nW = _num_windows(L, gh, gw, w, layout)
        return kv.new_empty((B, nW, 3, H, D)), kv.new_empty((B, L, 2, H, D))
