"""The per-head QK-RMSNorm + rotate-half RoPE prologue of the attention kernels, forward and backward,
as ``@triton.jit`` helpers on row tiles, plus the head-dim tiling shared by the attention kernels.

Rows are addressed by element offsets, so inputs may be row-strided views (the q/k/v slots of one
packed projection output: token stride ``(H + 2 Hkv) * D``) and outputs separate or packed alike.

Head-dim tiles: ``D`` is covered by a power-of-two main tile ``D0`` and, when ``D`` is not a power of
two, a second small tile ``D1`` masked at ``d >= D`` (``64 -> 64``, ``76 -> 64 + 16``, ``80 -> 64 +
16``, ``128 -> 128``), so every matmul is a legal wgmma K and memory keeps the true head dim.

Forward, per head vector ``x`` (rows of a tile)::

    y = rope(norm(x) * w),  norm(x) = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)
    rope(z) = z * cos + rot(z) * sin,  rot([z1, z2]) = [-z2, z1]   (tokens >= P; prefix tokens: y = z)

Backward from ``g = dL/dy`` (fp32, in registers)::

    gz  = g * cos + rot^T(g * sin),  rot^T([u1, u2]) = [u2, -u1]
    dx  = rstd * (gz * w - xhat * mean(gz * w * xhat)),  xhat = x * rstd
    dw  = sum over rows of gz * xhat        (a per-program partial, summed by the caller)

``rot^T`` pairs column ``d`` with ``d +- D/2``: a permutation across the lanes of a register tile (and
across the D0/D1 tiles for D = 76/80), done with ``tl.gather`` on the register tiles (warp shuffles
or a shared-memory exchange, exact), once per tile in an epilogue: the gradient never makes an fp32
round trip through HBM to be re-read with permuted addresses.

Norm weights and RoPE tables are read in their own dtype (fp32 or the activations' dtype) and
converted in registers: no cast kernels before a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_operand

LOG2E = 1.4426950408889634


def split_head_dim(D: int) -> tuple[int, int, bool]:
    """(D0, D1, has_d1): a power-of-two main tile plus a masked power-of-two remainder tile."""
    if D < 16:
        raise ValueError(f"head dim {D} < 16: the attention kernels' tensor-core tiles need D >= 16")
    D0 = 16
    while D0 * 2 <= D:
        D0 *= 2
    rest = D - D0
    if rest == 0:
        return D0, 16, False
    return D0, max(16, triton.next_power_of_2(rest)), True


def tables(sin, cos):
    """RoPE tables as the kernels read them (their own dtype, contiguous) and the per-sample batch
    stride in elements (0 when one table is shared by the batch)."""
    if sin is None:
        return None, None, 0
    sin, cos = sin.contiguous(), cos.contiguous()
    return sin, cos, (sin.shape[1] * sin.shape[2] if sin.dim() == 3 else 0)


@triton.jit
def ld(ptrs, mask, other, INTERPRET: tl.constexpr):
    """A tile load; fp32 under the interpreter (it does not compute in bf16)."""
    x = tl.load(ptrs, mask=mask, other=other)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def ld32(ptrs, mask, other):
    """A parameter / table load converted to fp32 (any float dtype in memory)."""
    return tl.load(ptrs, mask=mask, other=other).to(tl.float32)


@triton.jit
def seq_len(SEQ_LENS, b, N, HAS_LENS: tl.constexpr):
    """Valid length of sample ``b`` (int32 or int64 storage), kept inside [0, N] so that a bad value
    can never address memory out of bounds (the op validates values before launching)."""
    if HAS_LENS:
        L = tl.minimum(tl.maximum(tl.load(SEQ_LENS + b).to(tl.int32), 0), N)
    else:
        L = N
    return L


@triton.jit
def _sumsq(X, row_off, rmask, C0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, INTERPRET: tl.constexpr):
    cols = C0 + tl.arange(0, BD)
    m = rmask[:, None] & (cols[None, :] < D)
    x = ld(X + row_off[:, None] + cols[None, :], m, 0.0, INTERPRET).to(tl.float32)
    return tl.sum(x * x, axis=1)


@triton.jit
def rstd_rows(X, row_off, rmask, eps, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              HAS_D1: tl.constexpr, INTERPRET: tl.constexpr):
    ss = _sumsq(X, row_off, rmask, 0, D0, D, INTERPRET)
    if HAS_D1:
        ss += _sumsq(X, row_off, rmask, D0, D1, D, INTERPRET)
    return 1.0 / tl.sqrt(ss / D + eps)


@triton.jit
def prologue_cols(X, row_off, tok, rmask, rstd, W, SIN, COS, srow, P,
                  C0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
                  HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Columns [C0, C0 + BD) of norm(x) (times w) then rotate-half RoPE for tokens >= P, in fp32.

    ``row_off``: element offset of each row's start; ``srow``: offset of each row's sin/cos row
    (only read where ``tok >= P``)."""
    cols = C0 + tl.arange(0, BD)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    x = ld(X + row_off[:, None] + cols[None, :], m2, 0.0, INTERPRET).to(tl.float32)
    if HAS_NORM:
        w = ld32(W + cols, cmask, 0.0)
        x = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        HALF: tl.constexpr = D // 2
        pc = tl.where(cols < HALF, cols + HALF, cols - HALF)
        sgn = tl.where(cols < HALF, -1.0, 1.0)
        xp = ld(X + row_off[:, None] + pc[None, :], m2, 0.0, INTERPRET).to(tl.float32)
        if HAS_NORM:
            wp = ld32(W + pc, cmask, 0.0)
            xp = xp * rstd[:, None] * wp[None, :]
        rm = ((tok >= P) & rmask)[:, None] & cmask[None, :]
        c = ld32(COS + srow[:, None] + cols[None, :], rm, 1.0)
        s = ld32(SIN + srow[:, None] + cols[None, :], rm, 0.0)
        x = x * c + sgn[None, :] * xp * s
    return x


@triton.jit
def prologue_rows(X, Y, x_off, y_off, tok, rmask, W, SIN, COS, srow, P, eps,
                  D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                  HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows of ``y = rope(norm(x) * w)`` (x rows at ``x_off``) written to Y at ``y_off`` in Y's dtype."""
    DTYPE: tl.constexpr = Y.dtype.element_ty
    if HAS_NORM:
        rstd = rstd_rows(X, x_off, rmask, eps, D, D0, D1, HAS_D1, INTERPRET)
    else:
        rstd = tl.zeros(x_off.shape, dtype=tl.float32)
    y0 = prologue_cols(X, x_off, tok, rmask, rstd, W, SIN, COS, srow, P, 0, D0, D, HAS_NORM, HAS_ROPE, INTERPRET)
    c0 = tl.arange(0, D0)
    tl.store(Y + y_off[:, None] + c0[None, :], as_operand(y0, DTYPE, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        y1 = prologue_cols(X, x_off, tok, rmask, rstd, W, SIN, COS, srow, P, D0, D1, D, HAS_NORM, HAS_ROPE,
                           INTERPRET)
        c1 = D0 + tl.arange(0, D1)
        tl.store(Y + y_off[:, None] + c1[None, :], as_operand(y1, DTYPE, INTERPRET),
                 mask=rmask[:, None] & (c1[None, :] < D))


@triton.jit
def head_rows_prologue(X, Y, r, rmask, HEADS, N, SX, W, SIN, COS, SIN_BSTRIDE, P, eps,
                       D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                       HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``prologue_rows`` on head rows ``r = (b*N + n)*HEADS + head`` of a ``(B, N, HEADS, D)`` x read
    through its token stride SX, written contiguous to Y (the k pre-passes of forward and backward)."""
    tok = (r // HEADS) % N
    b = r // (HEADS * N)
    srow = b.to(tl.int64) * SIN_BSTRIDE + (tok - P).to(tl.int64) * D
    x_off = (r // HEADS).to(tl.int64) * SX + (r % HEADS) * D
    prologue_rows(X, Y, x_off, r.to(tl.int64) * D, tok, rmask, W, SIN, COS, srow, P, eps,
                  D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)


@triton.jit
def rot_half_t(u0, u1, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr):
    """``rot^T(u)[d] = sgn(d) * u[pc(d)]`` (``pc(d) = d +- D/2``, ``sgn = +1`` for ``d < D/2``, else -1)
    on the two column tiles of a register tile, as register gathers (exact). Tile 0's sources may lie
    in either tile; tile 1's (``d >= D0 >= D/2``) all lie in tile 0."""
    HALF: tl.constexpr = D // 2
    d0 = tl.arange(0, D0)
    pc0 = tl.where(d0 < HALF, d0 + HALF, d0 - HALF)
    s0 = tl.where(d0 < HALF, 1.0, -1.0)
    at0 = tl.zeros(u0.shape, dtype=tl.int32)
    if HAS_D1:
        lo = tl.gather(u0, at0 + tl.minimum(pc0, D0 - 1)[None, :], 1)
        hi = tl.gather(u1, at0 + tl.maximum(pc0 - D0, 0)[None, :], 1)
        t0 = tl.where((pc0 < D0)[None, :], lo, hi) * s0[None, :]
        d1 = D0 + tl.arange(0, D1)
        src1 = tl.minimum(tl.maximum(d1 - HALF, 0), D0 - 1)
        t1 = tl.where((d1 < D)[None, :], -tl.gather(u0, tl.zeros(u1.shape, dtype=tl.int32) + src1[None, :], 1), 0.0)
    else:
        t0 = tl.gather(u0, at0 + pc0[None, :], 1) * s0[None, :]
        t1 = u1
    return t0, t1


@triton.jit
def prologue_bwd_tile(g0, g1, X, row_off, tok, rmask, W, SIN, COS, srow, P, eps,
                      D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``(dx0, dx1, dw0, dw1)``: the gradient of the rows' input x (fp32 tiles) and this tile's partial
    norm-weight gradient (fp32 columns; zeros without a norm), from the fp32 gradient tiles (g0, g1)
    of ``y = rope(norm(x) * w)``. Rows outside ``rmask`` must carry g = 0."""
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    cm1 = c1 < D
    if HAS_ROPE:
        rm = (tok >= P) & rmask
        cos0 = ld32(COS + srow[:, None] + c0[None, :], rm[:, None], 1.0)
        sin0 = ld32(SIN + srow[:, None] + c0[None, :], rm[:, None], 0.0)
        if HAS_D1:
            cos1 = ld32(COS + srow[:, None] + c1[None, :], rm[:, None] & cm1[None, :], 1.0)
            sin1 = ld32(SIN + srow[:, None] + c1[None, :], rm[:, None] & cm1[None, :], 0.0)
            t0, t1 = rot_half_t(g0 * sin0, g1 * sin1, D, D0, D1, HAS_D1)
            g1 = g1 * cos1 + t1
        else:
            t0, t1 = rot_half_t(g0 * sin0, g1, D, D0, D1, HAS_D1)
        g0 = g0 * cos0 + t0
    if HAS_NORM:
        x0 = ld(X + row_off[:, None] + c0[None, :], rmask[:, None], 0.0, INTERPRET).to(tl.float32)
        ss = tl.sum(x0 * x0, axis=1)
        if HAS_D1:
            x1 = ld(X + row_off[:, None] + c1[None, :], rmask[:, None] & cm1[None, :], 0.0, INTERPRET).to(tl.float32)
            ss += tl.sum(x1 * x1, axis=1)
        else:
            x1 = tl.zeros(g1.shape, dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(ss / D + eps)
        xh0 = x0 * rstd[:, None]
        xh1 = x1 * rstd[:, None]
        gw0 = g0 * ld32(W + c0, c0 < D, 0.0)[None, :]
        gw1 = g1 * ld32(W + c1, cm1, 0.0)[None, :]
        mean = (tl.sum(gw0 * xh0, axis=1) + tl.sum(gw1 * xh1, axis=1)) / D
        dw0 = tl.sum(g0 * xh0, axis=0)
        dw1 = tl.sum(g1 * xh1, axis=0)
        dx0 = rstd[:, None] * (gw0 - xh0 * mean[:, None])
        dx1 = rstd[:, None] * (gw1 - xh1 * mean[:, None])
    else:
        dx0 = g0
        dx1 = g1
        dw0 = tl.zeros([D0], dtype=tl.float32)
        dw1 = tl.zeros([D1], dtype=tl.float32)
    return dx0, dx1, dw0, dw1


@triton.jit
def store_rows(Y, row_off, rmask, y0, y1, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               HAS_D1: tl.constexpr, INTERPRET: tl.constexpr):
    """Store fp32 tiles (y0, y1) into rows of Y in Y's dtype (round to nearest even)."""
    DTYPE: tl.constexpr = Y.dtype.element_ty
    c0 = tl.arange(0, D0)
    tl.store(Y + row_off[:, None] + c0[None, :], as_operand(y0, DTYPE, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        tl.store(Y + row_off[:, None] + c1[None, :], as_operand(y1, DTYPE, INTERPRET),
                 mask=rmask[:, None] & (c1[None, :] < D))


@triton.jit
def store_cols(PART, row, v0, v1, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr):
    """One fp32 row (v0 | v1) of a (rows, D) partial-sum buffer."""
    c0 = tl.arange(0, D0)
    tl.store(PART + row * D + c0, v0, mask=c0 < D)
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        tl.store(PART + row * D + c1, v1, mask=c1 < D)


@triton.jit
def sum_rows(PART, lo, hi, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
             BLOCK: tl.constexpr):
    """Column sums of rows [lo, hi) of a (rows, D) fp32 buffer, in a fixed order (deterministic). Read
    through L2 (``.cg``): the rows were written by other programs of the same launch."""
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    a0 = tl.zeros([D0], dtype=tl.float32)
    a1 = tl.zeros([D1], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        m = r < hi
        a0 += tl.sum(tl.load(PART + r[:, None] * D + c0[None, :], mask=m[:, None] & (c0[None, :] < D), other=0.0,
                             cache_modifier=".cg"), axis=0)
        if HAS_D1:
            a1 += tl.sum(tl.load(PART + r[:, None] * D + c1[None, :], mask=m[:, None] & (c1[None, :] < D),
                                 other=0.0, cache_modifier=".cg"), axis=0)
    return a0, a1


@triton.jit
def last_program(COUNTER, total):
    """True in exactly one program of the launch: the last one to get here. The barrier orders every
    thread's earlier stores before the counter's release (the pattern of CUTLASS's semaphore), so the
    last program sees every other program's partials."""
    tl.debug_barrier()
    done = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    return done == total - 1
