"""Flash attention (forward + backward) with GQA, fused QK-RMSNorm + rotate-half RoPE prologue and
per-sample valid lengths, on the projections' ``(B, N, heads, D)`` layout.

Contract: ``sapiens2/ops/attention.py`` (``_attention_ref`` / ``_attention_bwd_ref`` define it).

Layout and head dims
    q, o ``(B, N, H, D)``; k, v ``(B, N, Hkv, D)``, all contiguous with the TRUE head dim in memory
    (no padding). Query head ``h`` reads KV head ``h // (H // Hkv)`` through its pointer; K and V
    are never expanded or copied. The head dim is split into a power-of-two main tile ``D0`` and,
    when ``D`` is not a power of two, a second small tile ``D1`` (masked at ``d >= D``):
    ``D=64 -> 64``, ``D=128 -> 128``, ``D=76 -> 64 + 16`` (12 used), ``D=80 -> 64 + 16``. Every
    matmul is issued as one dot over D0 plus one over D1, so D=80 does 80/128 = 62% less wasted
    tensor-core work than padding the tile to 128, and each tile is a legal wgmma K (multiple of 16).

Forward (``attention_fwd``)
    * k pre-pass (only with norm and/or RoPE): ``_norm_rope_kernel`` writes the normalised and
      rotated k once to a scratch tensor in k's dtype (not saved, recomputed in backward). Doing it
      inside the attention loop would redo the norm + RoPE of every K tile once per query block
      (N / BLOCK_M times, plus the partner-column loads of rotate-half) on the CUDA cores of the
      hot loop; the pre-pass costs one extra read + write of k (~2 * B*N*Hkv*D elements).
    * ``_attn_fwd_kernel``: one program per (query block, b * H + h). q's norm + RoPE are fused into
      its prologue (done once per q tile). Online softmax in the exp2 domain, fp32 accumulation;
      the full key blocks run without masks, the ragged tail block (keys >= seq_len) masks.
      Keys are only visited up to ``seq_lens[b]``. Saves ``o`` and ``lse`` (natural log, fp32).

Backward (``attention_bwd``), FA2 style, recomputing the prologue
    1. pre-pass: normalised + rotated q and k into scratch (only with norm/RoPE);
    2. ``_bwd_prep_kernel``: ``delta = rowsum(dO * O)`` and ``lse2 = lse * log2(e)`` with
       ``+inf`` for query rows ``>= seq_len`` (so their probabilities are exactly 0 and the main
       kernels need no row masks);
    3. ``_bwd_dkdv_kernel``: a program per (key block, b * Hkv + kv_head) loops over the G query
       heads of its group and their query blocks; dK/dV are accumulated in registers and written
       once: no atomics, no expanded buffers;
    4. ``_bwd_dq_kernel``: a program per (query block, b * H + h) loops over key blocks;
    5. with norm/RoPE, dq and dk come out of 3/4 in fp32 and ``_norm_rope_bwd_kernel`` applies the
       inverse rotation and the RMSNorm backward row-wise, writing dq/dk in the input dtype and
       per-program partial sums of the norm-weight gradient into a ``(num_programs, D)`` fp32
       buffer, summed afterwards (no atomics). The inverse rotation pairs column ``d`` with
       ``d +- D/2``, a cross-lane permutation of the tensor-core accumulator that Triton cannot
       express on registers (and for D=76/80 it crosses the D0/D1 tiles); re-reading the fp32
       gradient with permuted addresses in a row-wise pass costs ~12 bytes per element, negligible
       next to the O(N^2 D) attention work at N = 3081.

Numerics: fp32 accumulation and fp32 softmax always; fp32 inputs use IEEE fp32 dots
(``input_precision="ieee"``, not TF32); fp16/bf16 feed the tensor cores in their own dtype.
Norm and RoPE in fp32 (sin/cos are converted to fp32 tables by the launcher, tiny).

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): bf16 arithmetic is not emulated there, so every
loaded fp16/bf16 tile is upcast to fp32 right after loading, operands that the GPU path rounds to
the input dtype are rounded in fp32 registers (round-to-nearest-even emulated on the bits for
bf16, whose interpreted conversion truncates), and stores are pre-rounded the same way.

Block sizes (``_fwd_config`` / ``_bwd_config``, per head dim and dtype, Hopper-oriented, no
autotune), for fp16/bf16:
    forward        D=64: BLOCK_M=128, BLOCK_N=128; D=76/80/128: 128 x 64; 8 warps, 3 stages
    bwd dK/dV      D=64: 64 queries x 128 keys; D>64: 64 x 64; 8 warps, 2 stages
    bwd dQ         D=64: 128 queries x 64 keys, 8 warps; D>64: 64 x 64, 4 warps; 2 stages
    row kernels    norm+RoPE 32 rows, its backward 16 rows, delta 64 rows; 4 warps
fp32 (IEEE dots, no tensor cores): 64 x 32 tiles, 4 warps.

``SHIPPED_CONFIGS``: every (kernel, dtype, head dim, constexpr flags, config) the launchers can
pick for bf16/fp16 at real shapes, as ``{"name", "fn", "signature", "constexprs", "attrs",
"num_warps", "num_stages"}``. ``attrs`` (``ASTSource`` form, ``{(arg_index,): [["tt.divisibility",
16]]}``) marks the pointer arguments 16-byte aligned, as the runtime JIT specialises them for torch
allocations; compiling without it gives scalar, unvectorised loads (and spills) that never run.
The launchers convert sin/cos and norm weights to fp32 and seq_lens to int32 (all tiny), so those
pointers have one type in every config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import signature
from ._common import as_operand, rne_bf16  # noqa: F401

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _ld(ptrs, mask, other, INTERPRET: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=other)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _sumsq(X, row_off, rmask, C0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, INTERPRET: tl.constexpr):
    cols = C0 + tl.arange(0, BD)
    m = rmask[:, None] & (cols[None, :] < D)
    x = _ld(X + row_off[:, None] + cols[None, :], m, 0.0, INTERPRET).to(tl.float32)
    return tl.sum(x * x, axis=1)


@triton.jit
def _rstd(X, row_off, rmask, eps, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
          HAS_D1: tl.constexpr, INTERPRET: tl.constexpr):
    ss = _sumsq(X, row_off, rmask, 0, D0, D, INTERPRET)
    if HAS_D1:
        ss += _sumsq(X, row_off, rmask, D0, D1, D, INTERPRET)
    return 1.0 / tl.sqrt(ss / D + eps)


@triton.jit
def _prologue_cols(X, row_off, tok, rmask, rstd, W, SIN, COS, srow, P,
                   C0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
                   HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Columns [C0, C0 + BD) of norm(x) (times w) then rotate-half RoPE for tokens >= P, in fp32.

    ``row_off``: element offset of each row's start; ``srow``: offset of each row's sin/cos row
    (only read where ``tok >= P``)."""
    cols = C0 + tl.arange(0, BD)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    x = _ld(X + row_off[:, None] + cols[None, :], m2, 0.0, INTERPRET).to(tl.float32)
    if HAS_NORM:
        w = tl.load(W + cols, mask=cmask, other=0.0)
        x = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        HALF: tl.constexpr = D // 2
        pc = tl.where(cols < HALF, cols + HALF, cols - HALF)
        sgn = tl.where(cols < HALF, -1.0, 1.0)
        xp = _ld(X + row_off[:, None] + pc[None, :], m2, 0.0, INTERPRET).to(tl.float32)
        if HAS_NORM:
            wp = tl.load(W + pc, mask=cmask, other=0.0)
            xp = xp * rstd[:, None] * wp[None, :]
        rm = ((tok >= P) & rmask)[:, None] & cmask[None, :]
        c = tl.load(COS + srow[:, None] + cols[None, :], mask=rm, other=1.0)
        s = tl.load(SIN + srow[:, None] + cols[None, :], mask=rm, other=0.0)
        x = x * c + sgn[None, :] * xp * s
    return x


@triton.jit
def _rope_bwd_cols(GR, row_off, tok, rmask, SIN, COS, srow, P,
                   C0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Columns [C0, C0 + BD) of ``g * cos + rot^T(g * sin)`` (g fp32 rows of GR)."""
    cols = C0 + tl.arange(0, BD)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    g = tl.load(GR + row_off[:, None] + cols[None, :], mask=m2, other=0.0)
    if HAS_ROPE:
        HALF: tl.constexpr = D // 2
        pc = tl.where(cols < HALF, cols + HALF, cols - HALF)
        sgn = tl.where(cols < HALF, 1.0, -1.0)  # rot^T([y1, y2]) = [y2, -y1]
        gp = tl.load(GR + row_off[:, None] + pc[None, :], mask=m2, other=0.0)
        rm = ((tok >= P) & rmask)[:, None] & cmask[None, :]
        c = tl.load(COS + srow[:, None] + cols[None, :], mask=rm, other=1.0)
        sp = tl.load(SIN + srow[:, None] + pc[None, :], mask=rm, other=0.0)
        g = g * c + sgn[None, :] * gp * sp
    return g


# ----------------------------------------------------------------------------------------------
# norm + RoPE pre-pass (k in forward; q and k in backward) and its backward


@triton.jit
def _norm_rope_kernel(X, Y, W, SIN, COS, R, N, HEADS, P, SIN_BSTRIDE, eps,
                      D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Rows r of the flattened (B*N*HEADS, D) x: y = rope(norm(x)) in Y's dtype."""
    DTYPE: tl.constexpr = Y.dtype.element_ty
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    tok = (r // HEADS) % N
    b = r // (HEADS * N)
    row_off = r.to(tl.int64) * D
    srow = b.to(tl.int64) * SIN_BSTRIDE + (tok - P).to(tl.int64) * D
    if HAS_NORM:
        rstd = _rstd(X, row_off, rmask, eps, D, D0, D1, HAS_D1, INTERPRET)
    else:
        rstd = tl.zeros([BLOCK_R], dtype=tl.float32)
    y0 = _prologue_cols(X, row_off, tok, rmask, rstd, W, SIN, COS, srow, P, 0, D0, D, HAS_NORM, HAS_ROPE, INTERPRET)
    c0 = tl.arange(0, D0)
    tl.store(Y + row_off[:, None] + c0[None, :], as_operand(y0, DTYPE, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        y1 = _prologue_cols(X, row_off, tok, rmask, rstd, W, SIN, COS, srow, P, D0, D1, D, HAS_NORM, HAS_ROPE,
                            INTERPRET)
        c1 = D0 + tl.arange(0, D1)
        tl.store(Y + row_off[:, None] + c1[None, :], as_operand(y1, DTYPE, INTERPRET),
                 mask=rmask[:, None] & (c1[None, :] < D))


@triton.jit
def _norm_rope_bwd_kernel(GR, X, DX, W, DW_PART, SIN, COS, R, N, HEADS, P, SIN_BSTRIDE, eps,
                          D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                          HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                          INTERPRET: tl.constexpr):
    """dx of ``rope(norm(x))`` from the fp32 gradient GR of its output, row-wise; this program's
    partial sum of the norm-weight gradient goes to row ``program_id`` of DW_PART."""
    DTYPE: tl.constexpr = DX.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    dw0 = tl.zeros([D0], dtype=tl.float32)
    dw1 = tl.zeros([D1], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), nprog):
        r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < R
        tok = (r // HEADS) % N
        b = r // (HEADS * N)
        row_off = r.to(tl.int64) * D
        srow = b.to(tl.int64) * SIN_BSTRIDE + (tok - P).to(tl.int64) * D
        g0 = _rope_bwd_cols(GR, row_off, tok, rmask, SIN, COS, srow, P, 0, D0, D, HAS_ROPE)
        if HAS_D1:
            g1 = _rope_bwd_cols(GR, row_off, tok, rmask, SIN, COS, srow, P, D0, D1, D, HAS_ROPE)
        else:
            g1 = tl.zeros([BLOCK_R, D1], dtype=tl.float32)
        if HAS_NORM:
            m0 = rmask[:, None]
            m1 = rmask[:, None] & (c1[None, :] < D)
            x0 = _ld(X + row_off[:, None] + c0[None, :], m0, 0.0, INTERPRET).to(tl.float32)
            ss = tl.sum(x0 * x0, axis=1)
            if HAS_D1:
                x1 = _ld(X + row_off[:, None] + c1[None, :], m1, 0.0, INTERPRET).to(tl.float32)
                ss += tl.sum(x1 * x1, axis=1)
            rstd = 1.0 / tl.sqrt(ss / D + eps)
            xh0 = x0 * rstd[:, None]
            gw0 = g0 * tl.load(W + c0)[None, :]
            dot_ = tl.sum(gw0 * xh0, axis=1)
            dw0 += tl.sum(g0 * xh0, axis=0)
            if HAS_D1:
                xh1 = x1 * rstd[:, None]
                gw1 = g1 * tl.load(W + c1, mask=c1 < D, other=0.0)[None, :]
                dot_ += tl.sum(gw1 * xh1, axis=1)
                dw1 += tl.sum(g1 * xh1, axis=0)
            mean = dot_ / D
            dx0 = rstd[:, None] * (gw0 - xh0 * mean[:, None])
            if HAS_D1:
                dx1 = rstd[:, None] * (gw1 - xh1 * mean[:, None])
        else:
            dx0 = g0
            dx1 = g1
        tl.store(DX + row_off[:, None] + c0[None, :], as_operand(dx0, DTYPE, INTERPRET), mask=rmask[:, None])
        if HAS_D1:
            tl.store(DX + row_off[:, None] + c1[None, :], as_operand(dx1, DTYPE, INTERPRET),
                     mask=rmask[:, None] & (c1[None, :] < D))
    if HAS_NORM:
        tl.store(DW_PART + pid * D + c0, dw0)
        if HAS_D1:
            tl.store(DW_PART + pid * D + c1, dw1, mask=c1 < D)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, kv_base, kv_stride, L, lo, hi, qk_scale,
               D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        row = kv_base + offs_n.to(tl.int64) * kv_stride
        k0 = _ld(K + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if HAS_D1:
            m1 = nmask[:, None] & (c1[None, :] < D)
            k1 = _ld(K + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
        s = s * qk_scale
        if MASK:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pp = as_operand(p, DTYPE, INTERPRET)
        v0 = _ld(V + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        acc0 = tl.dot(pp, v0, acc0 * alpha[:, None], input_precision=PREC)
        if HAS_D1:
            v1 = _ld(V + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            acc1 = tl.dot(pp, v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, QW, SIN, COS, SEQ_LENS,
                     N, H, G, P, SIN_BSTRIDE, eps, qk_scale,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                     HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_LENS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                     INTERPRET: tl.constexpr):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV = H // G
    hk = h // G
    if HAS_LENS:
        L = tl.load(SEQ_LENS + b)
    else:
        L = N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < N
    q_row = ((b * N + offs_m).to(tl.int64) * H + h) * D
    srow = b.to(tl.int64) * SIN_BSTRIDE + (offs_m - P).to(tl.int64) * D
    # prologue: q norm + RoPE, once per q tile
    if HAS_NORM:
        rstd = _rstd(Q, q_row, rmask, eps, D, D0, D1, HAS_D1, INTERPRET)
    else:
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    q0 = as_operand(_prologue_cols(Q, q_row, offs_m, rmask, rstd, QW, SIN, COS, srow, P, 0, D0, D,
                            HAS_NORM, HAS_ROPE, INTERPRET), DTYPE, INTERPRET)
    if HAS_D1:
        q1 = as_operand(_prologue_cols(Q, q_row, offs_m, rmask, rstd, QW, SIN, COS, srow, P, D0, D1, D,
                                HAS_NORM, HAS_ROPE, INTERPRET), DTYPE, INTERPRET)
    else:
        q1 = tl.zeros([BLOCK_M, D1], dtype=q0.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    kv_base = (b * N * HKV + hk).to(tl.int64) * D
    kv_stride = HKV * D
    n_full = (L // BLOCK_N) * BLOCK_N
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, kv_base, kv_stride, L, 0, n_full,
                                      qk_scale, D, D0, D1, HAS_D1, BLOCK_N, False, PREC, DTYPE, INTERPRET)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, kv_base, kv_stride, L, n_full, L,
                                      qk_scale, D, D0, D1, HAS_D1, BLOCK_N, True, PREC, DTYPE, INTERPRET)
    valid = offs_m < L
    inv_l = 1.0 / l_i
    o0 = tl.where(valid[:, None], acc0 * inv_l[:, None], 0.0)
    c0 = tl.arange(0, D0)
    tl.store(O + q_row[:, None] + c0[None, :], as_operand(o0, DTYPE, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        o1 = tl.where(valid[:, None], acc1 * inv_l[:, None], 0.0)
        tl.store(O + q_row[:, None] + c1[None, :], as_operand(o1, DTYPE, INTERPRET),
                 mask=rmask[:, None] & (c1[None, :] < D))
    lse = tl.where(valid, (m_i + tl.math.log2(l_i)) * _LN2, 0.0)
    tl.store(LSE + (b * H + h).to(tl.int64) * N + offs_m, lse, mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_prep_kernel(O, DO, LSE, DELTA, LSE2, SEQ_LENS, N, H,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                     HAS_LENS: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """delta = rowsum(dO * O); lse2 = lse * log2(e), +inf on query rows >= seq_len (P = 0 there)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if HAS_LENS:
        L = tl.load(SEQ_LENS + b)
    else:
        L = N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < N
    row = ((b * N + offs_m).to(tl.int64) * H + h) * D
    c0 = tl.arange(0, D0)
    o0 = _ld(O + row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET).to(tl.float32)
    do0 = _ld(DO + row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET).to(tl.float32)
    delta = tl.sum(o0 * do0, axis=1)
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        m1 = rmask[:, None] & (c1[None, :] < D)
        o1 = _ld(O + row[:, None] + c1[None, :], m1, 0.0, INTERPRET).to(tl.float32)
        do1 = _ld(DO + row[:, None] + c1[None, :], m1, 0.0, INTERPRET).to(tl.float32)
        delta += tl.sum(o1 * do1, axis=1)
    valid = offs_m < L
    st = (b * H + h).to(tl.int64) * N + offs_m
    lse = tl.load(LSE + st, mask=rmask, other=0.0)
    tl.store(DELTA + st, tl.where(valid, delta, 0.0), mask=rmask)
    tl.store(LSE2 + st, tl.where(valid, lse * 1.4426950408889634, float("inf")), mask=rmask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, SEQ_LENS, N, H, G, qk_scale, scale,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                     HAS_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """dK, dV of one key block of one KV head, summed over the G query heads of its group."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HKV = H // G
    b = pid_bk // HKV
    hk = pid_bk % HKV
    if HAS_LENS:
        L = tl.load(SEQ_LENS + b)
    else:
        L = N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < L
    kv_row = ((b * N + offs_n).to(tl.int64) * HKV + hk) * D
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    m1n = nmask[:, None] & (c1[None, :] < D)
    k0 = _ld(K + kv_row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
    v0 = _ld(V + kv_row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
    if HAS_D1:
        k1 = _ld(K + kv_row[:, None] + c1[None, :], m1n, 0.0, INTERPRET)
        v1 = _ld(V + kv_row[:, None] + c1[None, :], m1n, 0.0, INTERPRET)
    else:
        k1 = tl.zeros([BLOCK_N, D1], dtype=k0.dtype)
        v1 = tl.zeros([BLOCK_N, D1], dtype=v0.dtype)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    # key blocks entirely past seq_len get zero gradients without visiting any query
    hi = tl.where(pid_n * BLOCK_N < L, L, 0)
    q_stride = H * D
    for g in range(G):
        h = hk * G + g
        q_base = (b * N * H + h).to(tl.int64) * D
        st_base = (b * H + h).to(tl.int64) * N
        for start_m in range(0, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mmask = offs_m < N
            q_row = q_base + offs_m.to(tl.int64) * q_stride
            q0 = _ld(Q + q_row[:, None] + c0[None, :], mmask[:, None], 0.0, INTERPRET)
            do0 = _ld(DO + q_row[:, None] + c0[None, :], mmask[:, None], 0.0, INTERPRET)
            # rows past seq_len (and past N) have lse2 = +inf: P^T = 0 there, no mask needed
            lse2 = tl.load(LSE2 + st_base + offs_m, mask=mmask, other=float("inf"))
            dl = tl.load(DELTA + st_base + offs_m, mask=mmask, other=0.0)
            sT = tl.dot(k0, tl.trans(q0), input_precision=PREC)
            if HAS_D1:
                m1m = mmask[:, None] & (c1[None, :] < D)
                q1 = _ld(Q + q_row[:, None] + c1[None, :], m1m, 0.0, INTERPRET)
                do1 = _ld(DO + q_row[:, None] + c1[None, :], m1m, 0.0, INTERPRET)
                sT = tl.dot(k1, tl.trans(q1), sT, input_precision=PREC)
            pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
            ppT = as_operand(pT, DTYPE, INTERPRET)
            dv0 = tl.dot(ppT, do0, dv0, input_precision=PREC)
            dpT = tl.dot(v0, tl.trans(do0), input_precision=PREC)
            if HAS_D1:
                dv1 = tl.dot(ppT, do1, dv1, input_precision=PREC)
                dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=PREC)
            dsT = as_operand(pT * (dpT - dl[None, :]), DTYPE, INTERPRET)
            dk0 = tl.dot(dsT, q0, dk0, input_precision=PREC)
            if HAS_D1:
                dk1 = tl.dot(dsT, q1, dk1, input_precision=PREC)
    # rows of dK/dV are independent: keys past seq_len are zeroed here
    OUT_K: tl.constexpr = DK.dtype.element_ty
    OUT_V: tl.constexpr = DV.dtype.element_ty
    rm = (offs_n < N)[:, None]
    tl.store(DK + kv_row[:, None] + c0[None, :],
             as_operand(tl.where(nmask[:, None], dk0 * scale, 0.0), OUT_K, INTERPRET), mask=rm)
    tl.store(DV + kv_row[:, None] + c0[None, :],
             as_operand(tl.where(nmask[:, None], dv0, 0.0), OUT_V, INTERPRET), mask=rm)
    if HAS_D1:
        m1 = rm & (c1[None, :] < D)
        tl.store(DK + kv_row[:, None] + c1[None, :],
                 as_operand(tl.where(nmask[:, None], dk1 * scale, 0.0), OUT_K, INTERPRET), mask=m1)
        tl.store(DV + kv_row[:, None] + c1[None, :],
                 as_operand(tl.where(nmask[:, None], dv1, 0.0), OUT_V, INTERPRET), mask=m1)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, kv_base, kv_stride, L, lo, hi, qk_scale,
              D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
              DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        row = kv_base + offs_n.to(tl.int64) * kv_stride
        k0 = _ld(K + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        v0 = _ld(V + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if HAS_D1:
            m1 = nmask[:, None] & (c1[None, :] < D)
            k1 = _ld(K + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            v1 = _ld(V + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(nmask[None, :], p, 0.0)
        ds = as_operand(p * (dp - dl[:, None]), DTYPE, INTERPRET)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PREC)
        if HAS_D1:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PREC)
    return dq0, dq1


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, SEQ_LENS, N, H, G, qk_scale, scale,
                   D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                   HAS_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, INTERPRET: tl.constexpr):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV = H // G
    hk = h // G
    if HAS_LENS:
        L = tl.load(SEQ_LENS + b)
    else:
        L = N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < N
    q_row = ((b * N + offs_m).to(tl.int64) * H + h) * D
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    m1 = rmask[:, None] & (c1[None, :] < D)
    q0 = _ld(Q + q_row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET)
    do0 = _ld(DO + q_row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET)
    if HAS_D1:
        q1 = _ld(Q + q_row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
        do1 = _ld(DO + q_row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
    else:
        q1 = tl.zeros([BLOCK_M, D1], dtype=q0.dtype)
        do1 = tl.zeros([BLOCK_M, D1], dtype=do0.dtype)
    st = (b * H + h).to(tl.int64) * N + offs_m
    lse2 = tl.load(LSE2 + st, mask=rmask, other=float("inf"))  # +inf past seq_len: P = 0, dQ = 0
    dl = tl.load(DELTA + st, mask=rmask, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    kv_base = (b * N * HKV + hk).to(tl.int64) * D
    kv_stride = HKV * D
    # query blocks entirely past seq_len: nothing to visit (their gradient is 0)
    hi = tl.where(pid_m * BLOCK_M < L, L, 0)
    n_full = (hi // BLOCK_N) * BLOCK_N
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, kv_base, kv_stride, L, 0, n_full,
                         qk_scale, D, D0, D1, HAS_D1, BLOCK_N, False, PREC, DTYPE, INTERPRET)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, kv_base, kv_stride, L, n_full, hi,
                         qk_scale, D, D0, D1, HAS_D1, BLOCK_N, True, PREC, DTYPE, INTERPRET)
    OUT: tl.constexpr = DQ.dtype.element_ty
    tl.store(DQ + q_row[:, None] + c0[None, :], as_operand(dq0 * scale, OUT, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        tl.store(DQ + q_row[:, None] + c1[None, :], as_operand(dq1 * scale, OUT, INTERPRET), mask=m1)


# ----------------------------------------------------------------------------------------------
# launch configuration


def _split_head_dim(D: int) -> tuple[int, int, bool]:
    """(D0, D1, has_d1): a power-of-two main tile plus a masked power-of-two remainder tile."""
    D0 = 16
    while D0 * 2 <= D:
        D0 *= 2
    rest = D - D0
    if rest == 0:
        return D0, 16, False
    return D0, max(16, triton.next_power_of_2(rest)), True


def _fwd_config(D: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:  # IEEE fp32 dots: no tensor cores, small tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _bwd_config(D: int, dtype: torch.dtype) -> dict:
    """dkdv: BLOCK_N keys held (K, V, dK, dV), BLOCK_M queries streamed; dq: the reverse."""
    if dtype == torch.float32:
        return dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
                    dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1))
    if D <= 64:
        return dict(dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
                    dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2))
    return dict(dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))


_ROW_BLOCK = dict(BLOCK_R=32, num_warps=4, num_stages=1)
_ROW_BWD_BLOCK = dict(BLOCK_R=16, num_warps=4, num_stages=1)  # x, g and their rotate-half partners live
_PREP_BLOCK = dict(BLOCK_M=64, num_warps=4, num_stages=1)
_MAX_NORM_BWD_PROGRAMS = 1024


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if (dtype == torch.float32 or _INTERPRET) else "tf32"


def _lens(seq_lens):
    return None if seq_lens is None else seq_lens.to(torch.int32).contiguous()


def _tables(q, sin, cos):
    """fp32 contiguous sin/cos and the per-sample batch stride (0 when shared)."""
    if sin is None:
        return None, None, 0
    sin = sin.to(torch.float32).contiguous()
    cos = cos.to(torch.float32).contiguous()
    stride = sin.shape[1] * sin.shape[2] if sin.dim() == 3 else 0
    return sin, cos, stride


def _norm_rope(x, w, sin, cos, p, sin_bstride, eps, dummy):
    """rope(norm(x)) of (B, N, heads, D) x into a new tensor of x's dtype."""
    B, N, heads, D = x.shape
    D0, D1, has_d1 = _split_head_dim(D)
    y = torch.empty_like(x)
    R = B * N * heads
    grid = (triton.cdiv(R, _ROW_BLOCK["BLOCK_R"]),)
    _norm_rope_kernel[grid](
        x, y, dummy if w is None else w, dummy if sin is None else sin, dummy if cos is None else cos,
        R, N, heads, p, sin_bstride, eps,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_NORM=w is not None, HAS_ROPE=sin is not None,
        BLOCK_R=_ROW_BLOCK["BLOCK_R"], INTERPRET=_INTERPRET,
        num_warps=_ROW_BLOCK["num_warps"], num_stages=_ROW_BLOCK["num_stages"],
    )
    return y


def _norm_rope_bwd(g, x, w, sin, cos, p, sin_bstride, eps, dummy):
    """(dx in x's dtype, dw fp32 (D,) or None) from the fp32 gradient g of rope(norm(x))."""
    B, N, heads, D = x.shape
    D0, D1, has_d1 = _split_head_dim(D)
    dx = torch.empty_like(x)
    R = B * N * heads
    nprog = max(1, min(triton.cdiv(R, _ROW_BWD_BLOCK["BLOCK_R"]), _MAX_NORM_BWD_PROGRAMS))
    part = torch.empty((nprog, D), device=x.device, dtype=torch.float32) if w is not None else dummy
    _norm_rope_bwd_kernel[(nprog,)](
        g, x, dx, dummy if w is None else w, part, dummy if sin is None else sin, dummy if cos is None else cos,
        R, N, heads, p, sin_bstride, eps,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_NORM=w is not None, HAS_ROPE=sin is not None,
        BLOCK_R=_ROW_BWD_BLOCK["BLOCK_R"], INTERPRET=_INTERPRET,
        num_warps=_ROW_BWD_BLOCK["num_warps"], num_stages=_ROW_BWD_BLOCK["num_stages"],
    )
    return dx, (part.sum(0) if w is not None else None)


# ----------------------------------------------------------------------------------------------
# launchers


def attention_fwd(q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps):
    """``(o (B, N, H, D) in q's dtype, lse (B, H, N) fp32)``; see the module docstring."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    p = int(num_prefix_tokens)
    has_norm = q_norm_weight is not None
    sin, cos, sin_bstride = _tables(q, sin, cos)
    has_rope = sin is not None
    lens = _lens(seq_lens)
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)
    qw = q_norm_weight.to(torch.float32).contiguous() if has_norm else None
    kw = k_norm_weight.to(torch.float32).contiguous() if has_norm else None
    kp = _norm_rope(k, kw, sin, cos, p, sin_bstride, norm_eps, dummy) if (has_norm or has_rope) else k
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    D0, D1, has_d1 = _split_head_dim(D)
    cfg = _fwd_config(D, q.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, kp, v, o, lse, qw if has_norm else dummy, sin if has_rope else dummy, cos if has_rope else dummy,
        lens if lens is not None else dummy,
        N, H, G, p, sin_bstride, float(norm_eps), float(scale) * LOG2E,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_NORM=has_norm, HAS_ROPE=has_rope, HAS_LENS=lens is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype), INTERPRET=_INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
                  norm_eps):
    """``(dq, dk, dv, dq_norm_weight, dk_norm_weight)``; the last two ``q.new_empty(0)`` without norms."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    p = int(num_prefix_tokens)
    has_norm = q_norm_weight is not None
    sin, cos, sin_bstride = _tables(q, sin, cos)
    has_rope = sin is not None
    prologue = has_norm or has_rope
    lens = _lens(seq_lens)
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)
    qw = q_norm_weight.to(torch.float32).contiguous() if has_norm else None
    kw = k_norm_weight.to(torch.float32).contiguous() if has_norm else None
    D0, D1, has_d1 = _split_head_dim(D)
    lens_arg = lens if lens is not None else dummy

    # 1. recompute the prologue once (scratch, input dtype)
    qp = _norm_rope(q, qw, sin, cos, p, sin_bstride, norm_eps, dummy) if prologue else q
    kp = _norm_rope(k, kw, sin, cos, p, sin_bstride, norm_eps, dummy) if prologue else k

    # 2. delta and lse2
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    _bwd_prep_kernel[(triton.cdiv(N, _PREP_BLOCK["BLOCK_M"]), B * H)](
        o, do, lse, delta, lse2, lens_arg, N, H,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_LENS=lens is not None, BLOCK_M=_PREP_BLOCK["BLOCK_M"],
        INTERPRET=_INTERPRET, num_warps=_PREP_BLOCK["num_warps"], num_stages=_PREP_BLOCK["num_stages"],
    )

    # 3. dK, dV per KV head (fp32 when the prologue backward follows)
    cfg = _bwd_config(D, q.dtype)
    acc_dtype = torch.float32 if prologue else q.dtype
    dk = torch.empty(k.shape, device=k.device, dtype=acc_dtype)
    dv = torch.empty_like(v)
    qk_scale = float(scale) * LOG2E
    c = cfg["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(N, c["BLOCK_N"]), B * Hkv)](
        qp, kp, v, do, lse2, delta, dk, dv, lens_arg, N, H, G, qk_scale, float(scale),
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_LENS=lens is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        PREC=_prec(q.dtype), INTERPRET=_INTERPRET, num_warps=c["num_warps"], num_stages=c["num_stages"],
    )

    # 4. dQ
    dq = torch.empty(q.shape, device=q.device, dtype=acc_dtype)
    c = cfg["dq"]
    _bwd_dq_kernel[(triton.cdiv(N, c["BLOCK_M"]), B * H)](
        qp, kp, v, do, lse2, delta, dq, lens_arg, N, H, G, qk_scale, float(scale),
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_LENS=lens is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        PREC=_prec(q.dtype), INTERPRET=_INTERPRET, num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    if not prologue:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)

    # 5. through RoPE and the RMSNorm
    dq, dqw = _norm_rope_bwd(dq, q, qw, sin, cos, p, sin_bstride, norm_eps, dummy)
    dk, dkw = _norm_rope_bwd(dk, k, kw, sin, cos, p, sin_bstride, norm_eps, dummy)
    if not has_norm:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dqw.to(q_norm_weight.dtype), dkw.to(k_norm_weight.dtype)


# ----------------------------------------------------------------------------------------------
# shipped configurations (AOT compile gate: sm_90a, no spills, shared memory <= 227 KiB)


def _shipped_configs() -> list:
    out = []
    flags = ((False, False), (True, False), (False, True), (True, True))
    for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for D in (64, 76, 80, 128):
            D0, D1, has_d1 = _split_head_dim(D)
            hd = dict(D=D, D0=D0, D1=D1, HAS_D1=has_d1, INTERPRET=False)
            x, f32, i32 = "*" + dt, "*fp32", "*i32"
            scal = dict(N="i32", H="i32", G="i32", P="i32", R="i32", HEADS="i32", SIN_BSTRIDE="i32",
                        eps="fp32", qk_scale="fp32", scale="fp32")

            def add(name, fn, types, cx, cfg):
                cx = {**hd, **cx}
                sig = signature(fn, {**scal, **types}, cx)
                # what the runtime JIT specialises on: torch allocations are 16-byte aligned
                attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
                out.append({"name": name, "fn": fn, "signature": sig, "constexprs": cx, "attrs": attrs,
                            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})

            # forward attention: q prologue flags x seq_lens
            cfg = _fwd_config(D, tdt)
            for norm, rope in flags:
                for lens in (False, True):
                    add(f"attn_fwd_{dt}_d{D}_norm{int(norm)}_rope{int(rope)}_lens{int(lens)}", _attn_fwd_kernel,
                        dict(Q=x, K=x, V=x, O=x, LSE=f32, QW=f32, SIN=f32, COS=f32, SEQ_LENS=i32),
                        dict(HAS_NORM=norm, HAS_ROPE=rope, HAS_LENS=lens, BLOCK_M=cfg["BLOCK_M"],
                             BLOCK_N=cfg["BLOCK_N"], PREC="tf32"), cfg)
            # norm + RoPE pre-pass and its backward (only launched with norm and/or RoPE)
            for norm, rope in flags[1:]:
                add(f"norm_rope_{dt}_d{D}_norm{int(norm)}_rope{int(rope)}", _norm_rope_kernel,
                    dict(X=x, Y=x, W=f32, SIN=f32, COS=f32),
                    dict(HAS_NORM=norm, HAS_ROPE=rope, BLOCK_R=_ROW_BLOCK["BLOCK_R"]), _ROW_BLOCK)
                add(f"norm_rope_bwd_{dt}_d{D}_norm{int(norm)}_rope{int(rope)}", _norm_rope_bwd_kernel,
                    dict(GR=f32, X=x, DX=x, W=f32, DW_PART=f32, SIN=f32, COS=f32),
                    dict(HAS_NORM=norm, HAS_ROPE=rope, BLOCK_R=_ROW_BWD_BLOCK["BLOCK_R"]), _ROW_BWD_BLOCK)
            bcfg = _bwd_config(D, tdt)
            for lens in (False, True):
                add(f"attn_bwd_prep_{dt}_d{D}_lens{int(lens)}", _bwd_prep_kernel,
                    dict(O=x, DO=x, LSE=f32, DELTA=f32, LSE2=f32, SEQ_LENS=i32),
                    dict(HAS_LENS=lens, BLOCK_M=_PREP_BLOCK["BLOCK_M"]), _PREP_BLOCK)
                # dK / dQ straight in the input dtype (no prologue) or fp32 (prologue backward follows)
                for acc in (dt, "fp32"):
                    c = bcfg["dkdv"]
                    add(f"attn_bwd_dkdv_{dt}_d{D}_lens{int(lens)}_dk{acc}", _bwd_dkdv_kernel,
                        dict(Q=x, K=x, V=x, DO=x, LSE2=f32, DELTA=f32, DK="*" + acc, DV=x, SEQ_LENS=i32),
                        dict(HAS_LENS=lens, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], PREC="tf32"), c)
                    c = bcfg["dq"]
                    add(f"attn_bwd_dq_{dt}_d{D}_lens{int(lens)}_dq{acc}", _bwd_dq_kernel,
                        dict(Q=x, K=x, V=x, DO=x, LSE2=f32, DELTA=f32, DQ="*" + acc, SEQ_LENS=i32),
                        dict(HAS_LENS=lens, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], PREC="tf32"), c)
    return out


SHIPPED_CONFIGS = _shipped_configs()
