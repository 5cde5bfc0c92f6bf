"""Triton kernels for the 4K window tokenizer: attention inside non-overlapping ``w x w`` windows
(with an optional per-window prefix / CLS token) and CLS-guided window pooling, forward and backward.

Contracts are those of the custom ops in ``sapiens2/ops/window_attention.py`` (the reference
implementations there are the definition):

* ``window_attention_fwd(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window,
  layout, scale) -> (o, prefix_o, lse)``
* ``window_attention_bwd(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o,
  prefix_o, lse, grid_h, grid_w, window, layout, scale) -> (dq, dk, dv, dprefix_q, dprefix_k,
  dprefix_v)``
* ``cls_pool_fwd(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale) -> (o, lse)``
* ``cls_pool_bwd(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale)
  -> (dcls_q, dcls_k, dcls_v, dk, dv)``

Tokens are ``(B, L, heads, D)``; ``layout="grid"`` finds window ``(i, j)``'s tokens by index
arithmetic in the row-major grid (no permute copy), ``layout="windows"`` holds K gathered windows
one after another. Prefix tensors are ``(B, nW, heads, D)``; lse is fp32 ``(B*nW, heads, P + w*w)``
(``(B*nW, heads, 1)`` for cls_pool). Outputs and gradients are new contiguous tensors.

Program layout: one program per (window, head), flattened as ``pid = (b*nW + window)*heads + head``
so that neighbouring programs read neighbouring heads of the same tokens (grid size B*nW*heads, no
65535 limit). A program loads the window's ``w*w`` token rows of q/k/v once as ``BLOCK_N x BLOCK_D``
tiles (``BLOCK_N = w*w``: 16 for w = 4, no padding rows; ``BLOCK_D = next_pow2(D)``, masked) and the
prefix (CLS) row as ``BLOCK_D`` vectors, whose score column (token queries x prefix key), row (prefix
query x token keys) and corner are vector ops beside the token x token tile. It computes the softmax
in registers and writes each output (forward) or each gradient (backward: P recomputed from lse,
dV = P^T dO, dP = dO V^T, delta = rowsum(dO*O), dS = P*(dP - delta)*scale, dQ = dS K, dK = dS^T Q,
and the prefix row/column terms) exactly once. Windows do not overlap, so there are no atomics and
no zero-initialisation. The token x token products use ``tl.dot`` when ``BLOCK_N >= 16`` (w >= 4),
otherwise broadcast-multiply + ``tl.sum`` (w = 2). cls_pool has one query per window: vector ops
only. Offsets are int64 (B*L*heads*D may exceed 2^31).

Numerics: fp32 softmax and accumulation always; fp32 inputs use IEEE fp32 dots (not TF32);
fp16/bf16 feed the tensor cores in their own dtype (P and dS rounded to it, as in FlashAttention).
A query with no valid key (no prefix, every key masked) gets o = 0 and lse = 0.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): bf16 arithmetic is not emulated there, so every
loaded fp16/bf16 tile is upcast to fp32 right after loading, the operands the GPU path rounds to the
input dtype are rounded in fp32 registers (round-to-nearest-even on the bits for bf16, whose
interpreted conversion truncates), and stores are pre-rounded the same way.

Block sizes and warps: ``_config`` (a Python heuristic, no autotune). ``SHIPPED_CONFIGS`` lists the
configurations the launchers pick at the real shapes (w = 4 with the CLS prefix, D 64/76/80,
bf16/fp16, grid and windows layouts, forward/backward, cls_pool forward/backward) for the AOT
compile gate (sm_90a): all compile without spills. Off the real shapes, the largest tiles (w = 8
with D = 128, or fp32 with IEEE dots at D = 128 / w = 8) compile with some register spills: correct,
slower, within shared memory (<= 128 KiB).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._aot import signature
from ._common import as_operand, rne_bf16  # noqa: F401

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _ld(ptrs, mask, INTERPRET: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _st(ptrs, x, mask, INTERPRET: tl.constexpr):
    DT: tl.constexpr = ptrs.dtype.element_ty
    tl.store(ptrs, as_operand(x, DT, INTERPRET).to(DT), mask=mask)


@triton.jit
def _mm_nt(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b(N, K)^T -> fp32 (M, N)."""
    if USE_DOT:
        r = tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        r = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return r


@triton.jit
def _mm_nn(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b (K, N) -> fp32 (M, N)."""
    if USE_DOT:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return r


@triton.jit
def _mm_tn(a, b, USE_DOT: tl.constexpr):
    """a (K, M)^T @ b (K, N) -> fp32 (M, N)."""
    if USE_DOT:
        r = tl.dot(tl.trans(a), b, input_precision="ieee")
    else:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[:, None, :], axis=0)
    return r


@triton.jit
def _window_rows(pid, NH, nW, nWc, gw, L, WINDOW: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row bookkeeping of one (window, head) program.

    Returns ``is_tok`` (tile row ``r`` is one of the window's ``w*w`` tokens; only false for padding
    when ``w*w`` is not a power of two), ``tok`` (int64 ``b*L + l``: the token's row in a
    ``(B*L, ...)`` tensor), ``l`` (token index in the sequence), ``b``, ``h`` (the head), ``bw``
    (int64 ``b*nW + window``: the prefix row) and ``pre_row`` (int64 row into the flattened
    ``(B*nW*heads)`` lse rows).
    """
    N: tl.constexpr = WINDOW * WINDOW
    h = pid % NH
    bw = pid // NH  # b * nW + window
    b = bw // nW
    widx = bw % nW
    r = tl.arange(0, BLOCK_N)
    is_tok = r < N
    r = tl.where(is_tok, r, 0)
    if GRID:
        wi = widx // nWc
        wj = widx % nWc
        l = (wi * WINDOW + r // WINDOW) * gw + wj * WINDOW + r % WINDOW
    else:
        l = widx * N + r
    tok = b.to(tl.int64) * L + l
    pre_row = bw.to(tl.int64) * NH + h
    return is_tok, tok, l, b, h, bw.to(tl.int64), pre_row


@triton.jit
def _key_valid(MASK, is_tok, l, b, L, HAS_MASK: tl.constexpr):
    valid = is_tok
    if HAS_MASK:
        tm = tl.load(MASK + b.to(tl.int64) * L + l, mask=is_tok, other=0)
        valid = valid & (tm != 0)
    return valid


@triton.jit
def _rowdot(x, y):
    """Row-wise dot of a (BLOCK_N, BLOCK_D) tile with a (BLOCK_D,) vector -> fp32 (BLOCK_N,)."""
    return tl.sum(x.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)


@triton.jit
def _colsum(w, x):
    """sum_r w[r] * x[r, :] -> fp32 (BLOCK_D,)."""
    return tl.sum(w[:, None] * x.to(tl.float32), axis=0)


# ----------------------------------------------------------------------------------------------
# window attention
#
# The w*w window tokens form the (BLOCK_N, BLOCK_D) tiles (BLOCK_N = w*w: no padding rows); the
# prefix (CLS) query/key/value are (BLOCK_D,) vectors, its score column / row / corner vector ops:
#   token rows:  scores [s_tp | S_tt]  (s_tp = Q_t . pk)
#   prefix row:  scores [s_pp | s_pt]  (s_pt = K_t . pq)


@triton.jit
def _wa_fwd_kernel(Q, K, V, PQ, PK, PV, MASK, O, PO, LSE,
                   L, NH, nW, nWc, gw, scale, s_tok, s_pre,
                   D: tl.constexpr, WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_MASK: tl.constexpr,
                   GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
                   INTERPRET: tl.constexpr):
    DT: tl.constexpr = Q.dtype.element_ty
    P: tl.constexpr = 1 if HAS_PREFIX else 0
    S: tl.constexpr = P + WINDOW * WINDOW
    pid = tl.program_id(0)
    is_tok, tok, l, b, h, bw, pre_row = _window_rows(pid, NH, nW, nWc, gw, L, WINDOW, GRID, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    in_off = tok[:, None] * s_tok + h * D + d[None, :]  # q, k, v: token stride s_tok (packed qkv)
    out_off = (tok[:, None] * NH + h) * D + d[None, :]  # o: contiguous
    pin_off = bw * s_pre + h * D + d
    tok_mask = is_tok[:, None] & dmask[None, :]
    r = tl.arange(0, BLOCK_N)

    q = _ld(Q + in_off, tok_mask, INTERPRET)
    k = _ld(K + in_off, tok_mask, INTERPRET)
    kvalid = _key_valid(MASK, is_tok, l, b, L, HAS_MASK)
    s = _mm_nt(q, k, USE_DOT) * scale
    s = tl.where(kvalid[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    if HAS_PREFIX:
        pk = _ld(PK + pin_off, dmask, INTERPRET)
        s_tp = _rowdot(q, pk) * scale
        m = tl.maximum(m, s_tp)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row without any valid key
    p = tl.where(kvalid[None, :], tl.exp(s - m[:, None]), 0.0)
    den = tl.sum(p, axis=1)
    if HAS_PREFIX:
        p_tp = tl.exp(s_tp - m)
        den += p_tp
    has_key = den > 0.0
    den = tl.where(has_key, den, 1.0)

    v = _ld(V + in_off, tok_mask, INTERPRET)
    acc = _mm_nn(as_operand(p, DT, INTERPRET), v, USE_DOT)
    if HAS_PREFIX:
        pv = _ld(PV + pin_off, dmask, INTERPRET)
        acc += p_tp[:, None] * pv.to(tl.float32)[None, :]
    o = tl.where(has_key[:, None], acc / den[:, None], 0.0)
    _st(O + out_off, o, tok_mask, INTERPRET)
    lse = tl.where(has_key, m + tl.log(den), 0.0)
    tl.store(LSE + pre_row * S + P + r, lse, mask=is_tok)

    if HAS_PREFIX:  # the prefix query: its own key, then the (unmasked) window tokens
        pq = _ld(PQ + pin_off, dmask, INTERPRET).to(tl.float32)
        s_pp = tl.sum(pq * pk.to(tl.float32), axis=0) * scale
        s_pt = tl.where(kvalid, _rowdot(k, pq) * scale, float("-inf"))
        m_p = tl.maximum(tl.max(s_pt, axis=0), s_pp)
        e_pt = tl.where(kvalid, tl.exp(s_pt - m_p), 0.0)
        e_pp = tl.exp(s_pp - m_p)
        den_p = tl.sum(e_pt, axis=0) + e_pp
        o_p = (_colsum(e_pt, v) + e_pp * pv.to(tl.float32)) / den_p
        _st(PO + pre_row * D + d, o_p, dmask, INTERPRET)
        tl.store(LSE + pre_row * S, m_p + tl.log(den_p))


@triton.jit
def _wa_bwd_kernel(DO, DPO, Q, K, V, PQ, PK, PV, MASK, O, PO, LSE,
                   DQ, DK, DV, DPQ, DPK, DPV, DB,
                   L, NH, nW, nWc, gw, scale, s_tok, s_pre, s_gtok, s_gpre,
                   D: tl.constexpr, WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_DPO: tl.constexpr,
                   HAS_MASK: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   USE_DOT: tl.constexpr, INTERPRET: tl.constexpr, BIAS: tl.constexpr = False):
    DT: tl.constexpr = Q.dtype.element_ty
    P: tl.constexpr = 1 if HAS_PREFIX else 0
    S: tl.constexpr = P + WINDOW * WINDOW
    pid = tl.program_id(0)
    is_tok, tok, l, b, h, bw, pre_row = _window_rows(pid, NH, nW, nWc, gw, L, WINDOW, GRID, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    in_off = tok[:, None] * s_tok + h * D + d[None, :]  # q, k, v (packed qkv: s_tok = 3*heads*D)
    g_off = tok[:, None] * s_gtok + h * D + d[None, :]  # dq, dk, dv (packed dqkv likewise)
    out_off = (tok[:, None] * NH + h) * D + d[None, :]  # o, do: contiguous
    tok_mask = is_tok[:, None] & dmask[None, :]
    r = tl.arange(0, BLOCK_N)
    pre_off = (bw * NH + h) * D + d  # prefix o / do: contiguous
    pin_off = bw * s_pre + h * D + d
    pg_off = bw * s_gpre + h * D + d

    # delta = rowsum(dO * O) first, so O's tile dies early
    do = _ld(DO + out_off, tok_mask, INTERPRET)
    delta = tl.sum(do.to(tl.float32) * _ld(O + out_off, tok_mask, INTERPRET).to(tl.float32), axis=1)
    q = _ld(Q + in_off, tok_mask, INTERPRET)
    k = _ld(K + in_off, tok_mask, INTERPRET)
    kvalid = _key_valid(MASK, is_tok, l, b, L, HAS_MASK)
    lse = tl.load(LSE + pre_row * S + P + r, mask=is_tok, other=0.0)

    s = _mm_nt(q, k, USE_DOT) * scale
    p = tl.where(kvalid[None, :] & is_tok[:, None], tl.exp(s - lse[:, None]), 0.0)
    dv = _mm_tn(as_operand(p, DT, INTERPRET), do, USE_DOT)
    v = _ld(V + in_off, tok_mask, INTERPRET)
    dp = _mm_nt(do, v, USE_DOT)
    ds = p * (dp - delta[:, None]) * scale
    ds_op = as_operand(ds, DT, INTERPRET)
    dq = _mm_nn(ds_op, k, USE_DOT)
    dk = _mm_tn(ds_op, q, USE_DOT)

    if HAS_PREFIX:
        pq = _ld(PQ + pin_off, dmask, INTERPRET).to(tl.float32)
        pk = _ld(PK + pin_off, dmask, INTERPRET).to(tl.float32)
        pv = _ld(PV + pin_off, dmask, INTERPRET).to(tl.float32)
        if HAS_DPO:
            pdo = _ld(DPO + pre_off, dmask, INTERPRET).to(tl.float32)
        else:
            pdo = tl.zeros([BLOCK_D], dtype=tl.float32)
        delta_p = tl.sum(pdo * _ld(PO + pre_off, dmask, INTERPRET).to(tl.float32), axis=0)
        lse_p = tl.load(LSE + pre_row * S)
        # token queries x prefix key (column 0)
        p_tp = tl.where(is_tok, tl.exp(_rowdot(q, pk) * scale - lse), 0.0)
        ds_tp = p_tp * (_rowdot(do, pv) - delta) * scale
        # prefix query x token keys (row 0) and x its own key (corner)
        p_pt = tl.where(kvalid, tl.exp(_rowdot(k, pq) * scale - lse_p), 0.0)
        ds_pt = p_pt * (_rowdot(v, pdo) - delta_p) * scale
        p_pp = tl.exp(tl.sum(pq * pk, axis=0) * scale - lse_p)
        ds_pp = p_pp * (tl.sum(pdo * pv, axis=0) - delta_p) * scale

        dq += ds_tp[:, None] * pk[None, :]
        dk += ds_pt[:, None] * pq[None, :]
        dv += p_pt[:, None] * pdo[None, :]
        dpq = _colsum(ds_pt, k) + ds_pp * pk
        dpk = _colsum(ds_tp, q) + ds_pp * pq
        dpv = _colsum(p_tp, do) + p_pp * pdo
        _st(DPQ + pg_off, dpq, dmask, INTERPRET)
        _st(DPK + pg_off, dpk, dmask, INTERPRET)
        _st(DPV + pg_off, dpv, dmask, INTERPRET)

    _st(DQ + g_off, dq, tok_mask, INTERPRET)
    _st(DK + g_off, dk, tok_mask, INTERPRET)
    _st(DV + g_off, dv, tok_mask, INTERPRET)
    if BIAS:
        # This program's share of the q/k/v projection's bias gradient: the column sums of the
        # gradients it just stored (rounded as stored), over its window's tokens and prefix row,
        # into its own (3, D) slot of a (B*nW, 3, heads, D) fp32 partial buffer (no atomics).
        GT: tl.constexpr = DQ.dtype.element_ty
        bq = tl.sum(tl.where(tok_mask, as_operand(dq, GT, INTERPRET).to(tl.float32), 0.0), axis=0)
        bk = tl.sum(tl.where(tok_mask, as_operand(dk, GT, INTERPRET).to(tl.float32), 0.0), axis=0)
        bv = tl.sum(tl.where(tok_mask, as_operand(dv, GT, INTERPRET).to(tl.float32), 0.0), axis=0)
        if HAS_PREFIX:
            bq += as_operand(dpq, GT, INTERPRET).to(tl.float32)
            bk += as_operand(dpk, GT, INTERPRET).to(tl.float32)
            bv += as_operand(dpv, GT, INTERPRET).to(tl.float32)
        db_off = (bw * 3 * NH + h) * D + d
        tl.store(DB + db_off, bq, mask=dmask)
        tl.store(DB + db_off + NH * D, bk, mask=dmask)
        tl.store(DB + db_off + 2 * NH * D, bv, mask=dmask)


# ----------------------------------------------------------------------------------------------
# cls_pool: one query (the window's CLS) against its own CLS key/value + the window's tokens


@triton.jit
def _cls_fwd_kernel(CQ, CK, CV, K, V, O, LSE,
                    L, NH, nW, nWc, gw, scale, s_tok, s_pre,
                    D: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    is_tok, tok, l, b, h, bw, pre_row = _window_rows(pid, NH, nW, nWc, gw, L, WINDOW, GRID, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    in_off = tok[:, None] * s_tok + h * D + d[None, :]  # k, v (packed kv: s_tok = 2*heads*D)
    tok_mask = is_tok[:, None] & dmask[None, :]
    pin_off = bw * s_pre + h * D + d  # cls q, k, v (packed: s_pre = 3*heads*D)
    out_off = (bw * NH + h) * D + d

    cq = _ld(CQ + pin_off, dmask, INTERPRET).to(tl.float32)
    ck = _ld(CK + pin_off, dmask, INTERPRET).to(tl.float32)
    k = _ld(K + in_off, tok_mask, INTERPRET)
    s = tl.where(is_tok, _rowdot(k, cq) * scale, float("-inf"))
    s_c = tl.sum(cq * ck, axis=0) * scale
    m = tl.maximum(tl.max(s, axis=0), s_c)
    p = tl.where(is_tok, tl.exp(s - m), 0.0)
    p_c = tl.exp(s_c - m)
    den = tl.sum(p, axis=0) + p_c
    v = _ld(V + in_off, tok_mask, INTERPRET)
    cv = _ld(CV + pin_off, dmask, INTERPRET).to(tl.float32)
    o = (_colsum(p, v) + p_c * cv) / den
    _st(O + out_off, o, dmask, INTERPRET)
    tl.store(LSE + pre_row, m + tl.log(den))


@triton.jit
def _cls_bwd_kernel(DO, CQ, CK, CV, K, V, O, LSE, DCQ, DCK, DCV, DK, DV,
                    L, NH, nW, nWc, gw, scale, s_tok, s_pre, s_gtok, s_gpre,
                    D: tl.constexpr, WINDOW: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    is_tok, tok, l, b, h, bw, pre_row = _window_rows(pid, NH, nW, nWc, gw, L, WINDOW, GRID, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    in_off = tok[:, None] * s_tok + h * D + d[None, :]
    g_off = tok[:, None] * s_gtok + h * D + d[None, :]
    tok_mask = is_tok[:, None] & dmask[None, :]
    out_off = (bw * NH + h) * D + d  # o, do: contiguous
    pin_off = bw * s_pre + h * D + d
    pg_off = bw * s_gpre + h * D + d

    do = _ld(DO + out_off, dmask, INTERPRET).to(tl.float32)
    delta = tl.sum(do * _ld(O + out_off, dmask, INTERPRET).to(tl.float32), axis=0)
    cq = _ld(CQ + pin_off, dmask, INTERPRET).to(tl.float32)
    ck = _ld(CK + pin_off, dmask, INTERPRET).to(tl.float32)
    cv = _ld(CV + pin_off, dmask, INTERPRET).to(tl.float32)
    lse = tl.load(LSE + pre_row)

    k = _ld(K + in_off, tok_mask, INTERPRET)
    p = tl.where(is_tok, tl.exp(_rowdot(k, cq) * scale - lse), 0.0)
    p_c = tl.exp(tl.sum(cq * ck, axis=0) * scale - lse)
    v = _ld(V + in_off, tok_mask, INTERPRET)
    ds = p * (_rowdot(v, do) - delta) * scale
    ds_c = p_c * (tl.sum(cv * do, axis=0) - delta) * scale

    _st(DK + g_off, ds[:, None] * cq[None, :], tok_mask, INTERPRET)
    _st(DV + g_off, p[:, None] * do[None, :], tok_mask, INTERPRET)
    _st(DCQ + pg_off, _colsum(ds, k) + ds_c * ck, dmask, INTERPRET)
    _st(DCK + pg_off, ds_c * cq, dmask, INTERPRET)
    _st(DCV + pg_off, p_c * do, dmask, INTERPRET)


# ----------------------------------------------------------------------------------------------
# configuration (Python heuristic, no autotune)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_n(window: int) -> int:
    return max(2, triton.next_power_of_2(window * window))


def _config(kind: str, window: int, D: int) -> dict:
    """Block sizes and launch options of one kernel ``kind`` in ("fwd", "bwd", "cls_fwd", "cls_bwd")."""
    bn = _block_n(window)
    bd = _block_d(D)
    fwd = kind in ("fwd", "cls_fwd")
    use_dot = kind in ("fwd", "bwd") and bn >= 16
    if kind in ("fwd", "bwd") and not use_dot:  # w = 2: 3D broadcast products of BLOCK_N^2 * BLOCK_D
        work = bn * bn * bd
        nw = 1 if work <= 256 else 2 if work <= 1024 else 4
    else:
        # (BLOCK_N, BLOCK_D) tiles. w=4 on sm_90a: fwd 72 / 115 registers (D 64 / D 76, 80) at 4 warps,
        # bwd 139 at 4 / 128 at 8, cls_pool 43..75 (see SHIPPED_CONFIGS and the compile gate)
        work = bn * bd
        nw = 2 if work <= 512 else 4 if work <= (2048 if fwd else 1024) else 8
        if kind == "bwd" and bn >= 64:  # w = 8: the (64, 64) score tiles
            nw = 8
    return {"BLOCK_N": bn, "BLOCK_D": bd, "USE_DOT": use_dot, "num_warps": nw, "num_stages": 1}


# ----------------------------------------------------------------------------------------------
# launchers


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _TL_DTYPES:
        raise NotImplementedError(f"window attention Triton kernels support fp32/fp16/bf16, got {x.dtype}")


def _c(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x.to(dtype).contiguous()


def _rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``(B, R, heads, D)`` q/k/v-like input and its row stride in elements. Rows may be strided
    (q, k, v as views of one packed ``(B, R, 3, heads, D)`` projection output) as long as each
    row's ``heads x D`` block is contiguous and the batch stride is R rows: then no copy is made."""
    B, R, NH, D = x.shape
    if x.dtype == dtype and x.stride(3) == 1 and x.stride(2) == D and x.stride(1) >= NH * D and (
            B == 1 or x.stride(0) == R * x.stride(1)):
        return x, x.stride(1)
    return x.to(dtype).contiguous(), NH * D


def _rows_shared(xs, dtype: torch.dtype):
    """``_rows`` for tensors read with one shared row stride (q, k, v; the prefixes): as they are when
    their strides agree (slots of one packed projection), else all made contiguous."""
    got = [_rows(x, dtype) for x in xs]
    if len({st for _, st in got}) == 1:
        return [t for t, _ in got], got[0][1]
    NH, D = xs[0].shape[2], xs[0].shape[3]
    return [_c(x, dtype) for x in xs], NH * D


def _out_rows(shape, like: torch.Tensor, dtype, out: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A gradient output: the caller's (possibly strided, e.g. a slot of a packed dqkv) view, or new."""
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype), shape[2] * shape[3]
    B, R, NH, D = out.shape
    assert tuple(out.shape) == tuple(shape) and out.dtype == dtype, (out.shape, shape, out.dtype, dtype)
    assert out.stride(3) == 1 and out.stride(2) == D and (B == 1 or out.stride(0) == R * out.stride(1))
    return out, out.stride(1)


def _geometry(L: int, grid_h: int, grid_w: int, window: int, layout: str):
    """(nW, nWc): windows per batch element, windows per grid row."""
    if layout not in ("grid", "windows"):
        raise ValueError(f"layout must be 'grid' or 'windows', got {layout!r}")
    nWc = grid_w // window
    if layout == "grid":
        return (grid_h // window) * nWc, nWc
    return L // (window * window), nWc


def window_attention_fwd(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale):
    """Returns (o, prefix_o, lse) exactly as ``sapiens2::window_attention``. q, k, v (and the
    prefixes) may be row-strided views of packed projections (see ``_rows``)."""
    _check_dtype(q)
    dt = q.dtype
    B, L, NH, D = q.shape
    nW, nWc = _geometry(L, grid_h, grid_w, window, layout)
    has_prefix = prefix_q is not None
    has_mask = token_mask is not None
    if has_mask and layout != "grid":
        raise ValueError("token_mask is only supported with layout='grid'")
    (q, k, v), s_tok = _rows_shared((q, k, v), dt)
    s_pre = NH * D
    pq = pk = pv = q
    if has_prefix:
        (pq, pk, pv), s_pre = _rows_shared((prefix_q, prefix_k, prefix_v), dt)
    S = window * window + (1 if has_prefix else 0)
    o = torch.empty((B, L, NH, D), device=q.device, dtype=dt)
    po = torch.empty((B, nW, NH, D), device=q.device, dtype=dt) if has_prefix else q.new_empty(0)
    lse = torch.empty((B * nW, NH, S), device=q.device, dtype=torch.float32)
    n_prog = B * nW * NH
    if n_prog == 0:
        return o, po, lse
    mask = token_mask.contiguous().view(torch.uint8) if has_mask else q
    cfg = _config("fwd", window, D)
    _wa_fwd_kernel[(n_prog,)](
        q, k, v, pq, pk, pv, mask, o, po if has_prefix else o, lse,
        L, NH, nW, nWc, grid_w, float(scale), s_tok, s_pre,
        D=D, WINDOW=window, HAS_PREFIX=has_prefix, HAS_MASK=has_mask, GRID=layout == "grid",
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], USE_DOT=cfg["USE_DOT"], INTERPRET=_INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, po, lse


def window_attention_bwd(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse,
                         grid_h, grid_w, window, layout, scale, grads_out=None, prefix_grads_out=None,
                         bias_partials=None):
    """Returns (dq, dk, dv, dprefix_q, dprefix_k, dprefix_v) exactly as
    ``sapiens2::window_attention_backward``. ``grads_out`` / ``prefix_grads_out``: optional
    (dq, dk, dv) views to write into (the slots of a packed dqkv), with one shared row stride.
    ``bias_partials``: optional fp32 ``(B*nW, 3, heads, D)`` buffer that receives each window's
    column sums of (dq, dk, dv) over its tokens and prefix row (a q/k/v bias gradient's partials)."""
    _check_dtype(q)
    dt = q.dtype
    B, L, NH, D = q.shape
    nW, nWc = _geometry(L, grid_h, grid_w, window, layout)
    has_prefix = prefix_q is not None
    has_dpo = has_prefix and dprefix_o is not None
    has_mask = token_mask is not None
    if has_mask and layout != "grid":
        raise ValueError("token_mask is only supported with layout='grid'")
    (q, k, v), s_tok = _rows_shared((q, k, v), dt)
    do, o = _c(do, dt), _c(o, dt)
    s_pre = NH * D
    pq = pk = pv = po = q
    if has_prefix:
        (pq, pk, pv), s_pre = _rows_shared((prefix_q, prefix_k, prefix_v), dt)
        po = _c(prefix_o, dt)
    dpo = _c(dprefix_o, dt) if has_dpo else do
    lse = lse.to(torch.float32).contiguous()
    outs = grads_out or (None, None, None)
    (dq, s_gtok), (dk, s_dk), (dv, s_dv) = (_out_rows((B, L, NH, D), q, dt, t) for t in outs)
    assert s_gtok == s_dk == s_dv
    s_gpre = NH * D
    if has_prefix:
        pouts = prefix_grads_out or (None, None, None)
        (dpq, s_gpre), (dpk, _), (dpv, _) = (_out_rows((B, nW, NH, D), q, dt, t) for t in pouts)
    else:
        dpq = dpk = dpv = q.new_empty(0)
    n_prog = B * nW * NH
    if n_prog == 0:
        return dq, dk, dv, dpq, dpk, dpv
    mask = token_mask.contiguous().view(torch.uint8) if has_mask else q
    cfg = _config("bwd", window, D)
    _wa_bwd_kernel[(n_prog,)](
        do, dpo, q, k, v, pq, pk, pv, mask, o, po, lse,
        dq, dk, dv, dpq if has_prefix else dq, dpk if has_prefix else dk, dpv if has_prefix else dv,
        bias_partials if bias_partials is not None else lse,
        L, NH, nW, nWc, grid_w, float(scale), s_tok, s_pre, s_gtok, s_gpre,
        D=D, WINDOW=window, HAS_PREFIX=has_prefix, HAS_DPO=has_dpo, HAS_MASK=has_mask, GRID=layout == "grid",
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], USE_DOT=cfg["USE_DOT"], INTERPRET=_INTERPRET,
        BIAS=bias_partials is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq, dk, dv, dpq, dpk, dpv


def cls_pool_fwd(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale):
    """Returns (o (B, nW, heads, D), lse (B*nW, heads, 1)) exactly as ``sapiens2::cls_pool``; the
    inputs may be row-strided views of packed projections."""
    _check_dtype(cls_q)
    dt = cls_q.dtype
    B, L, NH, D = k.shape
    nW, nWc = _geometry(L, grid_h, grid_w, window, layout)
    (k, v), s_tok = _rows_shared((k, v), dt)
    (cq, ck, cv), s_pre = _rows_shared((cls_q, cls_k, cls_v), dt)
    o = torch.empty((B, nW, NH, D), device=k.device, dtype=dt)
    lse = torch.empty((B * nW, NH, 1), device=k.device, dtype=torch.float32)
    n_prog = B * nW * NH
    if n_prog == 0:
        return o, lse
    cfg = _config("cls_fwd", window, D)
    _cls_fwd_kernel[(n_prog,)](
        cq, ck, cv, k, v, o, lse, L, NH, nW, nWc, grid_w, float(scale), s_tok, s_pre,
        D=D, WINDOW=window, GRID=layout == "grid", BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        INTERPRET=_INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, lse


def cls_pool_bwd(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale,
                 grads_out=None, cls_grads_out=None):
    """Returns (dcls_q, dcls_k, dcls_v, dk, dv) exactly as ``sapiens2::cls_pool_backward``;
    ``grads_out`` = optional (dk, dv) views, ``cls_grads_out`` = optional (dcls_q, dcls_k, dcls_v)
    views to write into (slots of packed gradients)."""
    _check_dtype(cls_q)
    dt = cls_q.dtype
    B, L, NH, D = k.shape
    nW, nWc = _geometry(L, grid_h, grid_w, window, layout)
    (k, v), s_tok = _rows_shared((k, v), dt)
    (cq, ck, cv), s_pre = _rows_shared((cls_q, cls_k, cls_v), dt)
    do, o = _c(do, dt), _c(o, dt)
    lse = lse.to(torch.float32).contiguous()
    (dcq, s_gpre), (dck, _), (dcv, _) = (_out_rows((B, nW, NH, D), k, dt, t) for t in (cls_grads_out or (None,) * 3))
    (dk, s_gtok), (dv, _) = (_out_rows((B, L, NH, D), k, dt, t) for t in (grads_out or (None,) * 2))
    n_prog = B * nW * NH
    if n_prog == 0:
        return dcq, dck, dcv, dk, dv
    cfg = _config("cls_bwd", window, D)
    _cls_bwd_kernel[(n_prog,)](
        do, cq, ck, cv, k, v, o, lse, dcq, dck, dcv, dk, dv, L, NH, nW, nWc, grid_w, float(scale),
        s_tok, s_pre, s_gtok, s_gpre,
        D=D, WINDOW=window, GRID=layout == "grid", BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        INTERPRET=_INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dcq, dck, dcv, dk, dv


# ----------------------------------------------------------------------------------------------
# shipped configurations (AOT compile gate, sm_90a)


def _configs(dtypes=("bf16", "fp16"), head_dims=(64, 76, 80), windows=(4,), layouts=("grid", "windows"),
             prefix_variants=((True, False, True),)) -> list:
    """Compile-gate entries; ``prefix_variants``: (HAS_PREFIX, HAS_MASK, HAS_DPO) of window attention."""
    out = []
    scal = dict(L="i32", NH="i32", nW="i32", nWc="i32", gw="i32", scale="fp32", s_tok="i32", s_pre="i32",
                s_gtok="i32", s_gpre="i32")
    for dt in dtypes:
        x, f32 = "*" + dt, "*fp32"
        for window in windows:
            for D in head_dims:
                for layout in layouts:
                    grid = layout == "grid"

                    def add(name, fn, kind, types, cx):
                        cfg = _config(kind, window, D)
                        cx = {"D": D, "WINDOW": window, "GRID": grid, "BLOCK_N": cfg["BLOCK_N"],
                              "BLOCK_D": cfg["BLOCK_D"], "INTERPRET": False, **cx}
                        if kind in ("fwd", "bwd"):
                            cx["USE_DOT"] = cfg["USE_DOT"]
                        out.append({"name": f"{name}_{dt}_d{D}_w{window}_{layout}", "fn": fn,
                                    "signature": signature(fn, {**scal, **types}, cx), "constexprs": cx,
                                    "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})

                    for has_prefix, has_mask, has_dpo in prefix_variants:
                        if has_mask and not grid:
                            continue
                        tag = ("_prefix" if has_prefix else "") + ("_mask" if has_mask else "")
                        add("window_attn_fwd" + tag, _wa_fwd_kernel, "fwd",
                            dict(Q=x, K=x, V=x, PQ=x, PK=x, PV=x, MASK="*u8", O=x, PO=x, LSE=f32),
                            dict(HAS_PREFIX=has_prefix, HAS_MASK=has_mask))
                        for bias in (False, True):
                            add("window_attn_bwd" + tag + ("" if has_dpo or not has_prefix else "_nodpo")
                                + ("_bias" if bias else ""),
                                _wa_bwd_kernel, "bwd",
                                dict(DO=x, DPO=x, Q=x, K=x, V=x, PQ=x, PK=x, PV=x, MASK="*u8", O=x, PO=x,
                                     LSE=f32, DQ=x, DK=x, DV=x, DPQ=x, DPK=x, DPV=x, DB=f32),
                                dict(HAS_PREFIX=has_prefix, HAS_DPO=has_dpo and has_prefix, HAS_MASK=has_mask,
                                     BIAS=bias))
                    add("cls_pool_fwd", _cls_fwd_kernel, "cls_fwd",
                        dict(CQ=x, CK=x, CV=x, K=x, V=x, O=x, LSE=f32), {})
                    add("cls_pool_bwd", _cls_bwd_kernel, "cls_bwd",
                        dict(DO=x, CQ=x, CK=x, CV=x, K=x, V=x, O=x, LSE=f32, DCQ=x, DCK=x, DCV=x, DK=x, DV=x),
                        {})
    return out


def _shipped_configs() -> list:
    """Real shapes: w = 4 with the CLS prefix (and dprefix_o), D 64/76/80, bf16/fp16, both layouts."""
    return _configs()


SHIPPED_CONFIGS = _shipped_configs()
