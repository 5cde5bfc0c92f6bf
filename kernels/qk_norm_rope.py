"""Per-head QK-RMSNorm + rotate-half 2D RoPE for q and k in one launch, forward and backward.

Layout ``(B, N, heads, D)``; one forward program per token handles all heads of q and of k. The
head vector is loaded as its two halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` (``BLOCK_HALF =
next_power_of_2(D/2)``, masked, so D = 76 or 80 need no padding in memory)::

    xn  = x * rstd * w,   rstd = 1 / sqrt(mean(x^2) + eps)
    out = [xn1 * cos1 - xn2 * sin1,  xn2 * cos2 + xn1 * sin2]      (tokens n >= p; else out = xn)

with ``sin/cos`` row ``n - p`` (shared ``(N - p, D)`` or per sample ``(B, N - p, D)``), in fp32.
Backward, per token (RoPE is a rotation, so its backward is the inverse rotation)::

    d1 = g1 * cos1 + g2 * sin2;   d2 = g2 * cos2 - g1 * sin1
    dx = rstd * (d * w - xhat * mean(d * w * xhat));   dw = sum_rows(d * xhat)

A backward program walks a block of tokens and keeps fp32 partial sums of both weight gradients,
written once per program and summed after (no atomics). Only rstd (fp32) is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .column_sum import column_sum
from ._common import INTERPRET, SHORT, check_dtype, store_val



def num_warps(block_h: int, block_half: int) -> int:
    """Enough threads that each holds ~4 elements of a (heads, D/2) tile: no spills at 32 heads."""
    return max(4, min(16, block_h * block_half // 256))


def bwd_num_warps(block_hq: int, block_hk: int, block_half: int) -> int:
    """The backward holds more per element; with GQA its q and k branches are differently shaped
    code paths, which doubles the live registers (255 at 4 warps for 16/8 heads): twice the warps,
    at most 8 (at 16 warps ptxas caps registers at 128 and 32/16 heads at D=76 spills; at 8: 255, none)."""
    nw = num_warps(max(block_hq, block_hk), block_half)
    return max(nw, min(8, 2 * nw)) if block_hq != block_hk else nw


@triton.jit
def _load_halves(P, base, c, m, HALF):
    x1 = tl.load(P + base + c, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(P + base + HALF + c, mask=m, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _fwd_heads(X, Y, RSTD, W, SIN, COS, tok, nheads, D, HALF, s_off, rot, eps,
               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_HALF)[None, :]
    cm = c < HALF
    m = (h < nheads) & cm
    base = (tok * nheads + h) * D
    x1, x2 = _load_halves(X, base, c, m, HALF)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    w1, w2 = _load_halves(W, 0, c, cm, HALF)
    n1 = x1 * rstd[:, None] * w1
    n2 = x2 * rstd[:, None] * w2
    rm = cm & rot
    s1, s2 = _load_halves(SIN, s_off, c, rm, HALF)
    c1, c2 = _load_halves(COS, s_off, c, rm, HALF)
    o1 = tl.where(rot, n1 * c1 - n2 * s1, n1)
    o2 = tl.where(rot, n2 * c2 + n1 * s2, n2)
    tl.store(Y + base + c, store_val(o1, Y.dtype.element_ty, INTERPRET), mask=m)
    tl.store(Y + base + HALF + c, store_val(o2, Y.dtype.element_ty, INTERPRET), mask=m)
    hv = tl.arange(0, BLOCK_H)
    tl.store(RSTD + tok * nheads + hv, rstd, mask=hv < nheads)


@triton.jit
def _fwd_kernel(Q, K, QO, KO, QR, KR, QW, KW, SIN, COS, N, HQ, HK, D, HALF, P, SIN_BSTRIDE, eps,
                BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                INTERPRET: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)  # b * N + n
    b = tok // N
    n = tok % N
    rot = n >= P
    s_off = b * SIN_BSTRIDE + (n - P) * D
    _fwd_heads(Q, QO, QR, QW, SIN, COS, tok, HQ, D, HALF, s_off, rot, eps, BLOCK_HQ, BLOCK_HALF, INTERPRET)
    _fwd_heads(K, KO, KR, KW, SIN, COS, tok, HK, D, HALF, s_off, rot, eps, BLOCK_HK, BLOCK_HALF, INTERPRET)


@triton.jit
def _bwd_heads(G, X, DX, W, RSTD, SIN, COS, tok, nheads, D, HALF, s_off, rot, dw1, dw2,
               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_HALF)[None, :]
    cm = c < HALF
    m = (h < nheads) & cm
    base = (tok * nheads + h) * D
    g1, g2 = _load_halves(G, base, c, m, HALF)
    x1, x2 = _load_halves(X, base, c, m, HALF)
    w1, w2 = _load_halves(W, 0, c, cm, HALF)
    hv = tl.arange(0, BLOCK_H)
    r = tl.load(RSTD + tok * nheads + hv, mask=hv < nheads, other=0.0)[:, None]
    rm = cm & rot
    s1, s2 = _load_halves(SIN, s_off, c, rm, HALF)
    c1, c2 = _load_halves(COS, s_off, c, rm, HALF)
    d1 = tl.where(rot, g1 * c1 + g2 * s2, g1)
    d2 = tl.where(rot, g2 * c2 - g1 * s1, g2)
    xh1 = x1 * r
    xh2 = x2 * r
    gw1 = d1 * w1
    gw2 = d2 * w2
    dot = (tl.sum(gw1 * xh1, axis=1) + tl.sum(gw2 * xh2, axis=1)) / D
    dx1 = r * (gw1 - xh1 * dot[:, None])
    dx2 = r * (gw2 - xh2 * dot[:, None])
    tl.store(DX + base + c, store_val(dx1, DX.dtype.element_ty, INTERPRET), mask=m)
    tl.store(DX + base + HALF + c, store_val(dx2, DX.dtype.element_ty, INTERPRET), mask=m)
    dw1 += tl.sum(d1 * xh1, axis=0)
    dw2 += tl.sum(d2 * xh2, axis=0)
    return dw1, dw2


@triton.jit
def _bwd_kernel(GQ, GK, Q, K, DQ, DK, QR, KR, QW, KW, SIN, COS, DQW_PART, DKW_PART, T, N, HQ, HK, D, HALF, P,
                SIN_BSTRIDE, tokens_per_program, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr):
    # grid axis 1 picks q (0) or k (1): one launch, and each program keeps only one tensor's state live
    pid = tl.program_id(0)
    w1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    w2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    first = pid.to(tl.int64) * tokens_per_program
    is_q = tl.program_id(1) == 0
    for i in range(0, tokens_per_program):
        tok = first + i
        if tok < T:
            b = tok // N
            n = tok % N
            rot = n >= P
            s_off = b * SIN_BSTRIDE + (n - P) * D
            if is_q:
                w1, w2 = _bwd_heads(GQ, Q, DQ, QW, QR, SIN, COS, tok, HQ, D, HALF, s_off, rot, w1, w2,
                                    BLOCK_HQ, BLOCK_HALF, INTERPRET)
            else:
                w1, w2 = _bwd_heads(GK, K, DK, KW, KR, SIN, COS, tok, HK, D, HALF, s_off, rot, w1, w2,
                                    BLOCK_HK, BLOCK_HALF, INTERPRET)
    c = tl.arange(0, BLOCK_HALF)
    cm = c < HALF
    if is_q:
        tl.store(DQW_PART + pid * D + c, w1, mask=cm)
        tl.store(DQW_PART + pid * D + HALF + c, w2, mask=cm)
    else:
        tl.store(DKW_PART + pid * D + c, w1, mask=cm)
        tl.store(DKW_PART + pid * D + HALF + c, w2, mask=cm)


def _blocks(q, k):
    D = q.shape[-1]
    if D % 4 or D > 512:
        raise ValueError(f"qk_norm_rope kernels take head dims divisible by 4 up to 512, got {D}")
    return triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]), triton.next_power_of_2(D // 2)


def _tables(sin, cos, B, N, P, D):
    sin, cos = sin.float().contiguous(), cos.float().contiguous()  # tiny; RoPE is computed in fp32
    return sin, cos, (0 if sin.dim() == 2 else (N - P) * D)


def qk_norm_rope_fwd(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens: int, eps: float):
    """-> (q_out, k_out, q_rstd (B, N, Hq) fp32, k_rstd (B, N, Hk) fp32)."""
    check_dtype(q, k, q_weight, k_weight)
    assert q.is_contiguous() and k.is_contiguous()
    B, N, HQ, D = q.shape
    HK = k.shape[2]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    qr = torch.empty(B, N, HQ, device=q.device, dtype=torch.float32)
    kr = torch.empty(B, N, HK, device=q.device, dtype=torch.float32)
    bq, bk, bh = _blocks(q, k)
    sin, cos, sbs = _tables(sin, cos, B, N, num_prefix_tokens, D)
    if B * N:
        _fwd_kernel[(B * N,)](q, k, qo, ko, qr, kr, q_weight.contiguous(), k_weight.contiguous(), sin, cos, N, HQ,
                              HK, D, D // 2, num_prefix_tokens, sbs, eps, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bh,
                              INTERPRET=INTERPRET, num_warps=num_warps(max(bq, bk), bh))
    return qo, ko, qr, kr


def qk_norm_rope_bwd(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens: int):
    """-> (dq, dk, dq_weight, dk_weight)."""
    check_dtype(dq, dk, q, k)
    B, N, HQ, D = q.shape
    HK = k.shape[2]
    T = B * N
    dqi, dki = torch.empty_like(q), torch.empty_like(k)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    programs = max(1, min(T, 4 * sms))
    per = triton.cdiv(T, programs) if T else 0
    part = torch.empty(2, programs, D, device=q.device, dtype=torch.float32)  # every program writes its rows
    dqw, dkw = part[0], part[1]
    bq, bk, bh = _blocks(q, k)
    sin, cos, sbs = _tables(sin, cos, B, N, num_prefix_tokens, D)
    if T:
        _bwd_kernel[(programs, 2)](dq, dk, q, k, dqi, dki, q_rstd, k_rstd, q_weight.contiguous(), k_weight.contiguous(),
                                 sin, cos, dqw, dkw, T, N, HQ, HK, D, D // 2, num_prefix_tokens, sbs, per,
                                 BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bh, INTERPRET=INTERPRET,
                                 num_warps=bwd_num_warps(bq, bk, bh))
    else:
        part.zero_()
    dqw, dkw = column_sum(part, q_weight.dtype, k_weight.dtype)  # one launch finishes both weight gradients
    return dqi, dki, dqw, dkw


def shipped_configs(dtypes=(torch.bfloat16, torch.float16)):
    """(heads, kv heads, head dim) of every variant: MHA and GQA layers."""
    from ._aot import entry

    shapes = {(12, 12, 64), (16, 16, 64), (16, 8, 64), (16, 16, 80), (16, 8, 80), (24, 24, 64), (24, 12, 64),
              (32, 32, 76), (32, 16, 76), (8, 8, 128), (16, 16, 128), (16, 8, 128)}
    out = []
    for dt in dtypes:
        for hq, hk, d in sorted(shapes):
            cx = {"BLOCK_HQ": triton.next_power_of_2(hq), "BLOCK_HK": triton.next_power_of_2(hk),
                  "BLOCK_HALF": triton.next_power_of_2(d // 2), "INTERPRET": False}
            nw = num_warps(max(cx["BLOCK_HQ"], cx["BLOCK_HK"]), cx["BLOCK_HALF"])
            ints = {a: "i32" for a in ("T", "N", "HQ", "HK", "D", "HALF", "P", "SIN_BSTRIDE", "tokens_per_program")}
            f32 = torch.float32
            out.append(entry(f"qk_norm_rope_fwd[{SHORT[dt]},H={hq},Hkv={hk},D={d}]", _fwd_kernel,
                             {"Q": dt, "K": dt, "QO": dt, "KO": dt, "QR": f32, "KR": f32, "QW": dt, "KW": dt,
                              "SIN": f32, "COS": f32, "eps": "fp32", **ints}, cx, nw))
            out.append(entry(f"qk_norm_rope_bwd[{SHORT[dt]},H={hq},Hkv={hk},D={d}]", _bwd_kernel,
                             {"GQ": dt, "GK": dt, "Q": dt, "K": dt, "DQ": dt, "DK": dt, "QR": f32, "KR": f32,
                              "QW": dt, "KW": dt, "SIN": f32, "COS": f32, "DQW_PART": f32, "DKW_PART": f32, **ints},
                             cx, bwd_num_warps(cx["BLOCK_HQ"], cx["BLOCK_HK"], cx["BLOCK_HALF"])))
    return out
