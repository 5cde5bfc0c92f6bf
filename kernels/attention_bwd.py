"""Flash attention backward with GQA, the QK-RMSNorm + RoPE prologue's backward folded in, and
per-sample valid lengths: 5 N x N x D GEMMs per head by default, 7 on the deterministic path.

Contract: ``sapiens2/ops/attention.py`` (``_attention_bwd_ref``); layout and head-dim tiles as in
``attention.py`` and ``attention_prologue.py``. With ``P = softmax(S)``, ``S = scale * Qp Kp^T``
(``Qp, Kp``: q and k after the prologue), per head::

    dV = P^T dO;   dP = dO V^T;   dS = P * (dP - delta),  delta = rowsum(dO * O);
    dQp = scale * dS Kp;   dKp = scale * dS^T Qp        (dK, dV summed over the G heads of a KV head)
    dq, dk, dw_q, dw_k  = the prologue's backward of dQp, dKp     (attention_prologue.prologue_bwd_tile)

Default path (``deterministic=False``), 3 launches, FlashAttention-2's schedule:

1. ``_bwd_prep_kernel``, one program per 32 flattened rows: ``delta`` for the q rows and, with
   a prologue, ``Qp`` and ``Kp`` recomputed into scratch (input dtype); it also clears the fp32 dQ
   accumulator (the default path) and the launch counter of step 3's reduction.
2. ``_bwd_kv_kernel``, one program per (key block, b * Hkv + kv head): keeps its K/V block and
   loops over the G query heads and their query blocks (up to ``seq_lens[b]``) recomputing
   ``S^T = Kp Qp^T`` and ``dP^T = V dO^T`` and accumulating ``dV += P^T dO`` and ``dK += dS^T Qp``
   in registers, and adds ``dS Kp`` of each query block into the fp32 dQ accumulator with atomics:
   5 GEMMs per (query block, key block) pair. Its epilogue applies the prologue's backward to dK
   in registers (inverse RoPE, RMSNorm backward against the raw k it re-reads) and writes dk and
   dv once in the input dtype, plus one fp32 partial sum of the k-norm weight gradient.
3. ``_bwd_dq_finalize_kernel``, persistent over the flattened q rows: reads the fp32 accumulator
   once, applies the scale and the prologue's backward, writes dq in the input dtype and a partial
   sum of the q-norm weight gradient; the last program to finish (an atomic counter) sums every
   partial of both weight gradients in a fixed order and writes them: no reduction launches, and
   the weight gradients are deterministic.

``deterministic=True``: step 2 writes no dQ (4 GEMMs) and step 3 is ``_bwd_dq_kernel``, one program
per (query block, b * H + h) looping over the key blocks to recompute ``S`` and ``dP`` and
accumulate ``dQ = dS Kp`` in registers (3 GEMMs, 7 in all, no atomics: bitwise reproducible), its
epilogue doing the prologue's backward and the last-program reduction as in step 3.

Query rows past ``seq_lens[b]`` get probability 0 (their log-sum-exp is taken as +inf when it is
read), so no row masks are needed in the GEMM loops; keys past it are masked at the tail block and
get zero dk, dv. Numerics as the forward: fp32 accumulation, the tensor-core operands (P, dS) in
the input dtype, the prologue backward in fp32.

Block sizes (``bwd_config``), fp16/bf16: main kernel 64 queries x 128 keys (D = 76, 128: 64 keys);
8 warps, 2 stages; deterministic dQ kernel D=64: 128 x 64, 8 warps; D=76/80: 64 x 64, 4 warps; D=128: 8 warps; row
kernels 32 rows (finalize 16), 4 warps; fp32 (IEEE dots): 32 x 64 / 64 x 32, 4 warps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import as_operand, store_val
from .attention import FLAGS, HEAD_DIMS, add_config, head_dim_constexprs, is_real, prec, token_stride
from .attention_prologue import (LOG2E, head_rows_prologue, last_program, ld, prologue_bwd_tile, prologue_rows, seq_len,
                                 split_head_dim, store_cols, store_rows, sum_rows, tables)


# ----------------------------------------------------------------------------------------------
# 1. preprocess


@triton.jit
def _bwd_prep_kernel(O, DO, DELTA, DQ_ACC, Q, QP, QW, K, KP, KW, SIN, COS, SEQ_LENS, COUNTER,
                     RQ, RK, N, H, HKV, P, SIN_BSTRIDE, SQ, SK, eps, NQ,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                     HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_LENS: tl.constexpr,
                     ZERO_DQ: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    """Programs [0, NQ): 32 flattened q rows each (delta, Qp, the dQ accumulator's zeros); programs
    [NQ, ...): 32 flattened k rows each (Kp, only launched with a prologue)."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(COUNTER, 0)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    if pid < NQ:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < RQ
        h = r % H
        tok = (r // H) % N
        b = r // (H * N)
        row = r.to(tl.int64) * D
        o0 = ld(O + row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET).to(tl.float32)
        do0 = ld(DO + row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET).to(tl.float32)
        delta = tl.sum(o0 * do0, axis=1)
        if HAS_D1:
            m1 = rmask[:, None] & (c1[None, :] < D)
            o1 = ld(O + row[:, None] + c1[None, :], m1, 0.0, INTERPRET).to(tl.float32)
            do1 = ld(DO + row[:, None] + c1[None, :], m1, 0.0, INTERPRET).to(tl.float32)
            delta += tl.sum(o1 * do1, axis=1)
        if HAS_LENS:
            L = tl.minimum(tl.maximum(tl.load(SEQ_LENS + b, mask=rmask, other=0).to(tl.int32), 0), N)
            delta = tl.where(tok < L, delta, 0.0)
        tl.store(DELTA + (b * H + h).to(tl.int64) * N + tok, delta, mask=rmask)
        if ZERO_DQ:
            store_rows(DQ_ACC, row, rmask, tl.zeros([BLOCK_R, D0], dtype=tl.float32),
                       tl.zeros([BLOCK_R, D1], dtype=tl.float32), D, D0, D1, HAS_D1, INTERPRET)
        if HAS_NORM or HAS_ROPE:
            srow = b.to(tl.int64) * SIN_BSTRIDE + (tok - P).to(tl.int64) * D
            q_in = (r // H).to(tl.int64) * SQ + h * D
            prologue_rows(Q, QP, q_in, row, tok, rmask, QW, SIN, COS, srow, P, eps, D, D0, D1, HAS_D1, HAS_NORM,
                          HAS_ROPE, INTERPRET)
    else:
        r = (pid - NQ) * BLOCK_R + tl.arange(0, BLOCK_R)
        head_rows_prologue(K, KP, r, r < RK, HKV, N, SK, KW, SIN, COS, SIN_BSTRIDE, P, eps,
                           D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)


# ----------------------------------------------------------------------------------------------
# 2. dK, dV (and the dQ atomics)


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, SEQ_LENS, KRAW, KW, SIN, COS, DW_PART, BPART,
                   N, H, G, P, SIN_BSTRIDE, SQ, SK, SV, SKR, SDK, SDV, eps, qk_scale, scale, BPART_W,
                   D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                   HAS_LENS: tl.constexpr, ATOMIC_DQ: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                   BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """dK, dV of one key block of one KV head, summed over the G query heads of its group; with
    ATOMIC_DQ also every query block's ``dS Kp`` added into DQ_ACC (fp32, unscaled); with BIAS the
    column sums of this block's dk and dv go to row ``b * n_blocks + block`` of BPART (k, then v)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HKV = H // G
    b = pid_bk // HKV
    hk = pid_bk % HKV
    L = seq_len(SEQ_LENS, b, N, HAS_LENS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < L
    tok_n = (b * N + offs_n).to(tl.int64)
    k_row = tok_n * SK + hk * D
    v_row = tok_n * SV + hk * D
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    m1n = nmask[:, None] & (c1[None, :] < D)
    k0 = ld(K + k_row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
    v0 = ld(V + v_row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
    if HAS_D1:
        k1 = ld(K + k_row[:, None] + c1[None, :], m1n, 0.0, INTERPRET)
        v1 = ld(V + v_row[:, None] + c1[None, :], m1n, 0.0, INTERPRET)
    else:
        k1 = tl.zeros([BLOCK_N, D1], dtype=k0.dtype)
        v1 = tl.zeros([BLOCK_N, D1], dtype=v0.dtype)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    # key blocks entirely past seq_len get zero gradients without visiting any query
    hi = tl.where(pid_n * BLOCK_N < L, L, 0)
    for g in range(G):
        h = hk * G + g
        q_base = (b * N).to(tl.int64) * SQ + h * D
        o_base = (b * N * H + h).to(tl.int64) * D  # dO and the dQ accumulator: contiguous (B, N, H, D)
        st_base = (b * H + h).to(tl.int64) * N
        for start_m in range(0, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mmask = offs_m < N
            q_row = q_base + offs_m.to(tl.int64) * SQ
            o_row = o_base + offs_m.to(tl.int64) * (H * D)
            q0 = ld(Q + q_row[:, None] + c0[None, :], mmask[:, None], 0.0, INTERPRET)
            do0 = ld(DO + o_row[:, None] + c0[None, :], mmask[:, None], 0.0, INTERPRET)
            # rows past seq_len (and past N): lse taken as +inf, so P^T = 0 there without a mask
            lse = tl.load(LSE + st_base + offs_m, mask=mmask, other=0.0)
            lse2 = tl.where(offs_m < L, lse * 1.4426950408889634, float("inf"))
            dl = tl.load(DELTA + st_base + offs_m, mask=mmask, other=0.0)
            sT = tl.dot(k0, tl.trans(q0), input_precision=PREC)
            if HAS_D1:
                m1m = mmask[:, None] & (c1[None, :] < D)
                q1 = ld(Q + q_row[:, None] + c1[None, :], m1m, 0.0, INTERPRET)
                do1 = ld(DO + o_row[:, None] + c1[None, :], m1m, 0.0, INTERPRET)
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
            if ATOMIC_DQ:
                # keys past seq_len were loaded as zero rows of Kp: they add nothing
                ds = tl.trans(dsT)
                tl.atomic_add(DQ_ACC + o_row[:, None] + c0[None, :], tl.dot(ds, k0, input_precision=PREC),
                              mask=mmask[:, None], sem="relaxed")
                if HAS_D1:
                    tl.atomic_add(DQ_ACC + o_row[:, None] + c1[None, :], tl.dot(ds, k1, input_precision=PREC),
                                  mask=m1m, sem="relaxed")
    # rows of dK/dV are independent: keys past seq_len are zeroed here
    rm = offs_n < N
    dv0 = tl.where(nmask[:, None], dv0, 0.0)
    dv1 = tl.where(nmask[:, None], dv1, 0.0)
    store_rows(DV, tok_n * SDV + hk * D, rm, dv0, dv1, D, D0, D1, HAS_D1, INTERPRET)
    if BIAS:  # dv's column sums now, so that the dv tile is dead during dk's epilogue (registers)
        brow = BPART + (b * tl.num_programs(0) + pid_n).to(tl.int64) * BPART_W
        store_cols(brow + (HKV + hk) * D, 0, tl.sum(dv0, axis=0), tl.sum(dv1, axis=0), D, D0, D1, HAS_D1)
    dk0 = tl.where(nmask[:, None], dk0 * scale, 0.0)
    dk1 = tl.where(nmask[:, None], dk1 * scale, 0.0)
    if HAS_NORM or HAS_ROPE:
        srow = b.to(tl.int64) * SIN_BSTRIDE + (offs_n - P).to(tl.int64) * D
        dk0, dk1, dw0, dw1 = prologue_bwd_tile(dk0, dk1, KRAW, tok_n * SKR + hk * D, offs_n, rm, KW, SIN, COS, srow,
                                               P, eps, D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)
        if HAS_NORM:
            store_cols(DW_PART, pid_bk * tl.num_programs(0) + pid_n, dw0, dw1, D, D0, D1, HAS_D1)
    store_rows(DK, tok_n * SDK + hk * D, rm, dk0, dk1, D, D0, D1, HAS_D1, INTERPRET)
    if BIAS:
        store_cols(brow + hk * D, 0, tl.sum(dk0, axis=0), tl.sum(dk1, axis=0), D, D0, D1, HAS_D1)


# ----------------------------------------------------------------------------------------------
# 3. dQ: finalize the atomic accumulator (default) or compute it without atomics (deterministic)


@triton.jit
def _finish_weight_grads(DW_PART, COUNTER, DKW, DQW, NK_PARTS, N_PARTS, total,
                         D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """In the launch's last program: both norm-weight gradients from their partial sums
    (rows [0, NK_PARTS) for k, [NK_PARTS, N_PARTS) for q), in their own dtype."""
    if last_program(COUNTER, total):
        KT: tl.constexpr = DKW.dtype.element_ty
        QT: tl.constexpr = DQW.dtype.element_ty
        a0, a1 = sum_rows(DW_PART, 0, NK_PARTS, D, D0, D1, HAS_D1, 32)
        store_cols(DKW, 0, store_val(a0, KT, INTERPRET), store_val(a1, KT, INTERPRET), D, D0, D1, HAS_D1)
        a0, a1 = sum_rows(DW_PART, NK_PARTS, N_PARTS, D, D0, D1, HAS_D1, 32)
        store_cols(DQW, 0, store_val(a0, QT, INTERPRET), store_val(a1, QT, INTERPRET), D, D0, D1, HAS_D1)


@triton.jit
def _bwd_dq_finalize_kernel(DQ_ACC, DQ, QRAW, QW, SIN, COS, DW_PART, COUNTER, DKW, DQW, BPART,
                            N, H, P, SIN_BSTRIDE, SQR, SDQ, eps, scale, NK_PARTS, BPART_W,
                            D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                            HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BIAS: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    """dq = prologue_bwd(scale * DQ_ACC) for BLOCK_T tokens of one head (``BLOCK_R`` rows at a time);
    with BIAS, the column sums of these dq rows go to row ``b * n_blocks + block`` of BPART."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_t = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    w0 = tl.zeros([D0], dtype=tl.float32)
    w1 = tl.zeros([D1], dtype=tl.float32)
    s0 = tl.zeros([D0], dtype=tl.float32)
    s1 = tl.zeros([D1], dtype=tl.float32)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    for t0 in range(0, BLOCK_T, BLOCK_R):
        n = pid_t * BLOCK_T + t0 + tl.arange(0, BLOCK_R)
        rmask = n < N
        tok = (b * N + n).to(tl.int64)
        row = (tok * H + h) * D  # the accumulator: contiguous (B, N, H, D)
        g0 = tl.load(DQ_ACC + row[:, None] + c0[None, :], mask=rmask[:, None], other=0.0) * scale
        if HAS_D1:
            g1 = tl.load(DQ_ACC + row[:, None] + c1[None, :], mask=rmask[:, None] & (c1[None, :] < D), other=0.0) * scale
        else:
            g1 = tl.zeros([BLOCK_R, D1], dtype=tl.float32)
        if HAS_NORM or HAS_ROPE:
            srow = b.to(tl.int64) * SIN_BSTRIDE + (n - P).to(tl.int64) * D
            g0, g1, dw0, dw1 = prologue_bwd_tile(g0, g1, QRAW, tok * SQR + h * D, n, rmask, QW, SIN, COS, srow, P, eps,
                                                 D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)
            w0 += dw0
            w1 += dw1
        store_rows(DQ, tok * SDQ + h * D, rmask, g0, g1, D, D0, D1, HAS_D1, INTERPRET)
        if BIAS:
            s0 += tl.sum(g0, axis=0)
            s1 += tl.sum(g1, axis=0)
    if BIAS:
        store_cols(BPART + (b * n_t + pid_t).to(tl.int64) * BPART_W + h * D, 0, s0, s1, D, D0, D1, HAS_D1)
    if HAS_NORM:
        nprog = n_t * tl.num_programs(1)
        store_cols(DW_PART, NK_PARTS + pid_bh * n_t + pid_t, w0, w1, D, D0, D1, HAS_D1)
        _finish_weight_grads(DW_PART, COUNTER, DKW, DQW, NK_PARTS, NK_PARTS + nprog, nprog,
                             D, D0, D1, HAS_D1, INTERPRET)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, k_base, k_stride, v_base, v_stride, L, lo, hi, qk_scale,
              D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
              DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        row = k_base + offs_n.to(tl.int64) * k_stride
        vrow = v_base + offs_n.to(tl.int64) * v_stride
        k0 = ld(K + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        v0 = ld(V + vrow[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if HAS_D1:
            m1 = nmask[:, None] & (c1[None, :] < D)
            k1 = ld(K + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            v1 = ld(V + vrow[:, None] + c1[None, :], m1, 0.0, INTERPRET)
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
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ_LENS, QRAW, QW, SIN, COS, DW_PART, COUNTER, DKW, DQW, BPART,
                   N, H, G, P, SIN_BSTRIDE, SQ, SK, SV, SQR, SDQ, eps, qk_scale, scale, NK_PARTS, BPART_W,
                   D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                   HAS_LENS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Deterministic dQ of one query block of one head (recomputing S and dP), with the prologue's
    backward in its epilogue."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    L = seq_len(SEQ_LENS, b, N, HAS_LENS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < N
    tok_m = (b * N + offs_m).to(tl.int64)
    q_row = tok_m * SQ + h * D
    o_row = (tok_m * H + h) * D  # dO: contiguous (B, N, H, D)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    m1 = rmask[:, None] & (c1[None, :] < D)
    q0 = ld(Q + q_row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET)
    do0 = ld(DO + o_row[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET)
    if HAS_D1:
        q1 = ld(Q + q_row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
        do1 = ld(DO + o_row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
    else:
        q1 = tl.zeros([BLOCK_M, D1], dtype=q0.dtype)
        do1 = tl.zeros([BLOCK_M, D1], dtype=do0.dtype)
    st = (b * H + h).to(tl.int64) * N + offs_m
    lse = tl.load(LSE + st, mask=rmask, other=0.0)
    lse2 = tl.where(offs_m < L, lse * 1.4426950408889634, float("inf"))  # P = 0, dQ = 0 past seq_len
    dl = tl.load(DELTA + st, mask=rmask, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    k_base = (b * N).to(tl.int64) * SK + hk * D
    v_base = (b * N).to(tl.int64) * SV + hk * D
    # query blocks entirely past seq_len: nothing to visit (their gradient is 0)
    hi = tl.where(pid_m * BLOCK_M < L, L, 0)
    n_full = (hi // BLOCK_N) * BLOCK_N
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, k_base, SK, v_base, SV, L, 0, n_full,
                         qk_scale, D, D0, D1, HAS_D1, BLOCK_N, False, PREC, DTYPE, INTERPRET)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, dl, K, V, k_base, SK, v_base, SV, L, n_full, hi,
                         qk_scale, D, D0, D1, HAS_D1, BLOCK_N, True, PREC, DTYPE, INTERPRET)
    dq0 = dq0 * scale
    dq1 = dq1 * scale
    if HAS_NORM or HAS_ROPE:
        srow = b.to(tl.int64) * SIN_BSTRIDE + (offs_m - P).to(tl.int64) * D
        dq0, dq1, dw0, dw1 = prologue_bwd_tile(dq0, dq1, QRAW, tok_m * SQR + h * D, offs_m, rmask, QW, SIN, COS,
                                               srow, P, eps, D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)
        if HAS_NORM:
            nprog = tl.num_programs(0) * tl.num_programs(1)
            store_cols(DW_PART, NK_PARTS + pid_bh * tl.num_programs(0) + pid_m, dw0, dw1, D, D0, D1, HAS_D1)
            _finish_weight_grads(DW_PART, COUNTER, DKW, DQW, NK_PARTS, NK_PARTS + nprog, nprog,
                                 D, D0, D1, HAS_D1, INTERPRET)
    store_rows(DQ, tok_m * SDQ + h * D, rmask, dq0, dq1, D, D0, D1, HAS_D1, INTERPRET)
    if BIAS:  # rows past N (and past seq_len) are zero
        brow = BPART + (b * tl.num_programs(0) + pid_m).to(tl.int64) * BPART_W + h * D
        store_cols(brow, 0, tl.sum(tl.where(rmask[:, None], dq0, 0.0), axis=0),
                   tl.sum(tl.where(rmask[:, None], dq1, 0.0), axis=0), D, D0, D1, HAS_D1)


# ----------------------------------------------------------------------------------------------
# launch configuration and launcher


def bwd_config(D: int, dtype: torch.dtype, norm: bool = True, rope: bool = True) -> dict:
    """kv: BLOCK_N keys held (K, V, dK, dV), BLOCK_M queries streamed; dq (deterministic): the reverse."""
    if dtype == torch.float32:
        return dict(kv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
                    dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1))
    if D <= 64:
        return dict(kv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
                    dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2))
    # D = 80: 128 keys per program, as FA2 for head dims up to 128: half the dQ atomics and half the
    # re-reads of Q and dO of 64 keys (on an H200, 64 keys made the atomic backward slower than the
    # deterministic one). D = 76 (its masked 12-of-16 tail tile), D = 128, the RoPE-only prologue and
    # fp16 spill registers at 128 keys (the compile gate): 64.
    keys = 128 if D == 80 and (norm or not rope) and dtype == torch.bfloat16 else 64
    return dict(kv=dict(BLOCK_M=64, BLOCK_N=keys, num_warps=8, num_stages=2),
                dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if D < 128 else 8, num_stages=2))


PREP_BLOCK = dict(BLOCK_R=32, num_warps=8, num_stages=1)
# the dQ finalize: one program per (BLOCK_T tokens, head), 16 rows at a time (g, x, sin/cos and the gathers
# live at once); BLOCK_T is the main kernel's key block, so both write bias partial rows b * n + block
FINALIZE_BLOCK = dict(BLOCK_R=16, num_warps=8, num_stages=1)


def attention_bwd(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
                  norm_eps, deterministic: bool = False, grads_out=None, bias_grad: bool = False):
    """``(dq, dk, dv, dq_norm_weight, dk_norm_weight)``; the last two ``q.new_empty(0)`` without norms.

    q, k, v may be token-strided views (the slots of one packed qkv); ``grads_out``: optional
    (dq, dk, dv) views to write into (the slots of a packed dqkv); do and o are contiguous.
    ``bias_grad``: also return the column sums of (dq | dk | dv) per head, ``((H + 2 Hkv) * D,)`` in q's
    dtype (the packed q/k/v projection's bias gradient), from per-program partial sums the kernels
    write beside their outputs and two column-sum launches."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    p = int(num_prefix_tokens)
    has_norm = q_norm_weight is not None
    sin, cos, sin_bstride = tables(sin, cos)
    has_rope = sin is not None
    prologue = has_norm or has_rope
    has_lens = seq_lens is not None
    D0, D1, has_d1 = split_head_dim(D)
    hd = dict(D=D, D0=D0, D1=D1, HAS_D1=has_d1, INTERPRET=_INTERPRET)
    dummy = q.new_empty(0)  # never read: stands in for absent optional pointers
    opt = lambda t: dummy if t is None else t  # noqa: E731
    lens, qw, kw = opt(seq_lens), opt(q_norm_weight), opt(k_norm_weight)
    sin_, cos_ = opt(sin), opt(cos)
    eps, qk_scale, scale = float(norm_eps), float(scale) * LOG2E, float(scale)
    RQ, RK = B * N * H, B * N * Hkv
    cfg = bwd_config(D, q.dtype, has_norm, has_rope)
    kvc, dqc = cfg["kv"], cfg["dq"]
    n_kb = triton.cdiv(N, kvc["BLOCK_N"])
    n_qb = triton.cdiv(N, dqc["BLOCK_M"]) if deterministic else n_kb  # query blocks of the dQ programs
    n_kparts = n_kb * B * Hkv
    n_qparts = n_qb * B * H

    # scratch (allocations only: every element is written by a kernel before it is read)
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    dq_acc = dummy if deterministic else torch.empty(q.shape, device=q.device, dtype=torch.float32)
    qp = torch.empty(q.shape, device=q.device, dtype=q.dtype) if prologue else q  # contiguous scratch
    kp = torch.empty(k.shape, device=k.device, dtype=k.dtype) if prologue else k
    counter = torch.empty(1, device=q.device, dtype=torch.int32)
    parts = torch.empty((n_kparts + n_qparts, D), device=q.device, dtype=torch.float32) if has_norm else dummy
    bq = torch.empty((B * n_qb, H * D), device=q.device, dtype=torch.float32) if bias_grad else dummy
    bkv = torch.empty((B * n_kb, 2 * Hkv * D), device=q.device, dtype=torch.float32) if bias_grad else dummy
    if grads_out is None:
        new = lambda t: torch.empty(t.shape, device=t.device, dtype=t.dtype)  # noqa: E731
        grads_out = (new(q), new(k), new(v))
    dq, dk, dv = grads_out
    sq, sk, sv = token_stride(q), token_stride(k), token_stride(v)
    sqp, skp = (token_stride(qp), token_stride(kp))
    dqw = torch.empty_like(q_norm_weight) if has_norm else q.new_empty(0)
    dkw = torch.empty_like(k_norm_weight) if has_norm else q.new_empty(0)

    # 1. delta, the prologue recomputed, zeros
    nq = triton.cdiv(RQ, PREP_BLOCK["BLOCK_R"])
    nk = triton.cdiv(RK, PREP_BLOCK["BLOCK_R"]) if prologue else 0
    _bwd_prep_kernel[(nq + nk,)](
        o, do, delta, dq_acc, q, qp, qw, k, kp, kw, sin_, cos_, lens, counter,
        RQ, RK, N, H, Hkv, p, sin_bstride, sq, sk, eps, nq,
        **hd, HAS_NORM=has_norm, HAS_ROPE=has_rope, HAS_LENS=has_lens, ZERO_DQ=not deterministic,
        BLOCK_R=PREP_BLOCK["BLOCK_R"], num_warps=PREP_BLOCK["num_warps"], num_stages=PREP_BLOCK["num_stages"],
    )
    # 2. dK, dV (+ dQ atomics), k's prologue backward in the epilogue
    _bwd_kv_kernel[(n_kb, B * Hkv)](
        qp, kp, v, do, lse, delta, dk, dv, dq_acc, lens, k, kw, sin_, cos_, parts, bkv,
        N, H, G, p, sin_bstride, sqp, skp, sv, sk, token_stride(dk), token_stride(dv), eps, qk_scale, scale,
        2 * Hkv * D,
        **hd, HAS_LENS=has_lens, ATOMIC_DQ=not deterministic, HAS_NORM=has_norm, HAS_ROPE=has_rope, BIAS=bias_grad,
        BLOCK_M=kvc["BLOCK_M"], BLOCK_N=kvc["BLOCK_N"], PREC=prec(q.dtype),
        num_warps=kvc["num_warps"], num_stages=kvc["num_stages"],
    )
    # 3. dQ, q's prologue backward, the weight gradients
    if deterministic:
        _bwd_dq_kernel[(n_qb, B * H)](
            qp, kp, v, do, lse, delta, dq, lens, q, qw, sin_, cos_, parts, counter, dkw, dqw, bq,
            N, H, G, p, sin_bstride, sqp, skp, sv, sq, token_stride(dq), eps, qk_scale, scale, n_kparts, H * D,
            **hd, HAS_LENS=has_lens, HAS_NORM=has_norm, HAS_ROPE=has_rope, BIAS=bias_grad,
            BLOCK_M=dqc["BLOCK_M"], BLOCK_N=dqc["BLOCK_N"], PREC=prec(q.dtype),
            num_warps=dqc["num_warps"], num_stages=dqc["num_stages"],
        )
    else:
        _bwd_dq_finalize_kernel[(n_kb, B * H)](
            dq_acc, dq, q, qw, sin_, cos_, parts, counter, dkw, dqw, bq,
            N, H, p, sin_bstride, sq, token_stride(dq), eps, scale, n_kparts, H * D,
            **hd, HAS_NORM=has_norm, HAS_ROPE=has_rope, BIAS=bias_grad, BLOCK_T=kvc["BLOCK_N"],
            BLOCK_R=FINALIZE_BLOCK["BLOCK_R"], num_warps=FINALIZE_BLOCK["num_warps"],
            num_stages=FINALIZE_BLOCK["num_stages"],
        )
    if not bias_grad:
        return dq, dk, dv, dqw, dkw
    from .column_sum import column_sum

    db = torch.empty((H + 2 * Hkv) * D, device=q.device, dtype=q.dtype)
    column_sum(bq[None], q.dtype, outs=(db[:H * D],))
    column_sum(bkv[None], q.dtype, outs=(db[H * D:],))
    return dq, dk, dv, dqw, dkw, db


# ----------------------------------------------------------------------------------------------
# shipped configurations


def shipped_bwd_configs(out: list) -> None:
    for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, f32, i64 = "*" + dt, "*fp32", "*i64"
        for D in HEAD_DIMS:
            hd = head_dim_constexprs(D)
            for norm, rope in FLAGS:
                cfg = bwd_config(D, tdt, norm, rope)
                for pt in ((dt, "fp32") if (norm or rope) else (dt,)):
                    par = "*" + pt
                    tag = f"{dt}_d{D}_norm{int(norm)}_rope{int(rope)}_par{pt}"
                    flags = dict(HAS_NORM=norm, HAS_ROPE=rope)
                    real = is_real(dt, D, norm, rope, pt)
                    add_config(out, f"attn_bwd_prep_{tag}", _bwd_prep_kernel,
                               dict(O=x, DO=x, DELTA=f32, DQ_ACC=f32, Q=x, QP=x, QW=par, K=x, KP=x, KW=par, SIN=par,
                                    COS=par, SEQ_LENS=i64, COUNTER="*i32"),
                               dict(hd, **flags, HAS_LENS=True, ZERO_DQ=True, BLOCK_R=PREP_BLOCK["BLOCK_R"]), PREP_BLOCK,
                               real)
                    for lens in (False, True):
                        for bias in (False, True):
                            for atomic in (True, False):
                                c = cfg["kv"]
                                add_config(out, f"attn_bwd_kv_{tag}_lens{int(lens)}_atomic{int(atomic)}_bias{int(bias)}",
                                           _bwd_kv_kernel,
                                           dict(Q=x, K=x, V=x, DO=x, LSE=f32, DELTA=f32, DK=x, DV=x, DQ_ACC=f32,
                                                SEQ_LENS=i64, KRAW=x, KW=par, SIN=par, COS=par, DW_PART=f32, BPART=f32,
                                                BPART_W="i32"),
                                           dict(hd, **flags, HAS_LENS=lens, ATOMIC_DQ=atomic, BIAS=bias,
                                                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], PREC="tf32"), c, real)
                            c = cfg["dq"]
                            add_config(out, f"attn_bwd_dq_{tag}_lens{int(lens)}_bias{int(bias)}", _bwd_dq_kernel,
                                       dict(Q=x, K=x, V=x, DO=x, LSE=f32, DELTA=f32, DQ=x, SEQ_LENS=i64, QRAW=x, QW=par,
                                            SIN=par, COS=par, DW_PART=f32, COUNTER="*i32", DKW=par, DQW=par, BPART=f32,
                                            BPART_W="i32"),
                                       dict(hd, **flags, HAS_LENS=lens, BIAS=bias, BLOCK_M=c["BLOCK_M"],
                                            BLOCK_N=c["BLOCK_N"], PREC="tf32"), c, real)
                    for bias in (False, True):
                        add_config(out, f"attn_bwd_dq_finalize_{tag}_bias{int(bias)}", _bwd_dq_finalize_kernel,
                                   dict(DQ_ACC=f32, DQ=x, QRAW=x, QW=par, SIN=par, COS=par, DW_PART=f32, COUNTER="*i32",
                                        DKW=par, DQW=par, BPART=f32, BPART_W="i32"),
                                   dict(hd, **flags, BIAS=bias, BLOCK_T=cfg["kv"]["BLOCK_N"],
                                        BLOCK_R=FINALIZE_BLOCK["BLOCK_R"]), FINALIZE_BLOCK, real)
