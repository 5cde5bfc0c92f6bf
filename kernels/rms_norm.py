"""RMSNorm and residual add (+ LayerScale) + RMSNorm, forward and backward, one row per program.

Forward (fp32 math, one read of each input, one write of each output)::

    rstd = 1 / sqrt(mean(x^2) + eps);  y = x * rstd * w                      (rms_norm)
    h = residual + s * x;  rstd = 1 / sqrt(mean(h^2) + eps);  y = h * rstd * w (add_rms_norm)

``h`` is rounded to its dtype before it is normalised, so ``y`` is the norm of the stored stream
(the value backward recomputes from). Only ``rstd`` (fp32, one per row) is saved beside inputs.

Backward, with ``xhat = h * rstd`` and ``g = dy * w``::

    dh_norm = rstd * (g - xhat * mean(g * xhat))
    gh      = dh_norm + dh           (the stream's own incoming gradient, fused: no extra add)
    dres    = gh;  dx = gh * s;  ds = sum_rows(gh * x);  dw = sum_rows(dy * xhat)

A backward program walks a contiguous block of rows and keeps fp32 partial sums of ``dw`` (and
``ds``) in registers, written once per program into a ``(programs, C)`` buffer and summed after
(per-program partial sums as in Liger-Kernel: no atomics on one row).

Block choice (no register spills on sm_90a for any width): the forward holds rows up to 4096
elements in registers as one power-of-two block (masked past C), the backward up to 2048. Wider
rows (the 2432 embedding width in backward, the 5B FFN width 9728 in both) use the chunked
kernels (``_fwd_wide_kernel`` / ``_bwd_wide_kernel``): column tiles, two passes over the row (the
second one re-reads it from L1/L2, the forward recomputes h rather than re-reading it), and each
backward program's partial ``dw`` / ``ds`` row updated in place in its own slot of the
partial buffer (still no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .column_sum import column_sum
from ._common import INTERPRET, SHORT, check_dtype, num_warps_for, reduction_programs, round_to, row_block, store_val

ONE_BLOCK_MAX = 4096  # widest row the forward keeps in registers as one block
ONE_BLOCK_MAX_BWD = 2048  # the backward keeps more live per element (w, s, two fp32 partial rows)
CHUNK, CHUNK_WARPS = 2048, 8  # column tile of the chunked forward
CHUNK_BWD, CHUNK_BWD_WARPS = 1024, 4  # column tile of the chunked backward
MAX_WIDTH = 1 << 20


def fwd_config(C: int) -> tuple[bool, int, int]:
    """(chunked, BLOCK or CHUNK, num_warps) the forward launchers pick for width C."""
    if C > MAX_WIDTH:
        raise ValueError(f"RMSNorm width {C} exceeds the kernel's limit of {MAX_WIDTH}")
    B = row_block(C)
    if B > ONE_BLOCK_MAX:
        return True, CHUNK, CHUNK_WARPS
    return False, B, num_warps_for(B)


def bwd_config(C: int) -> tuple[bool, int, int]:
    """(chunked, BLOCK or CHUNK, num_warps) the backward launchers pick for width C. One block up to
    2048 lanes (8 elements per thread); wider rows (2432, 9728) in 1024-column tiles: a 4096-lane
    block spills on sm_90a with LayerScale at 16 warps (128-register cap) and at 32 (64)."""
    if C > MAX_WIDTH:
        raise ValueError(f"RMSNorm width {C} exceeds the kernel's limit of {MAX_WIDTH}")
    B = row_block(C)
    if B > ONE_BLOCK_MAX_BWD:
        return True, CHUNK_BWD, CHUNK_BWD_WARPS
    return False, B, num_warps_for(B)


@triton.jit
def _stream(X, R, S, off, cols, m, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    """The normalised row's input in fp32: x, or h = residual + s * x rounded as PyTorch rounds it."""
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        if HAS_SCALE:
            s = tl.load(S + cols, mask=m, other=0.0).to(tl.float32)
            x = round_to(x * s, X.dtype.element_ty, INTERPRET)  # same roundings as residual + x * s
        x = tl.load(R + off, mask=m, other=0.0).to(tl.float32) + x
        x = round_to(x, R.dtype.element_ty, INTERPRET)
    return x


@triton.jit
def _fwd_kernel(X, R, S, W, Y, H, RSTD, C, eps, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    off = row * C + cols
    x = _stream(X, R, S, off, cols, m, HAS_RES, HAS_SCALE, INTERPRET)
    if HAS_RES:
        tl.store(H + off, store_val(x, H.dtype.element_ty, INTERPRET), mask=m)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + off, store_val(x * rstd * w, Y.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def _fwd_wide_kernel(X, R, S, W, Y, H, RSTD, C, eps, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                     CHUNK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, C, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        m = cols < C
        x = _stream(X, R, S, row * C + cols, cols, m, HAS_RES, HAS_SCALE, INTERPRET)
        if HAS_RES:
            tl.store(H + row * C + cols, store_val(x, H.dtype.element_ty, INTERPRET), mask=m)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, C, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        m = cols < C
        x = _stream(X, R, S, row * C + cols, cols, m, HAS_RES, HAS_SCALE, INTERPRET)  # recomputed, not re-read
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, store_val(x * rstd * w, Y.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def _bwd_kernel(DY, DH, X, H, S, W, RSTD, DX, DRES, DW_PART, DS_PART, M, C, rows_per_program,
                HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, HAS_SCALE: tl.constexpr,
                BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(S + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    ds = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < M:
            off = row * C + cols
            hv = tl.load(H + off, mask=m, other=0.0).to(tl.float32)  # H is X without a residual
            dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = hv * rstd
            g = dy * w
            gh = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C))
            dw += dy * xhat
            if HAS_DH:
                gh += tl.load(DH + off, mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                tl.store(DRES + off, store_val(gh, DRES.dtype.element_ty, INTERPRET), mask=m)
                if HAS_SCALE:
                    xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
                    ds += gh * xv
                    tl.store(DX + off, store_val(gh * s, DX.dtype.element_ty, INTERPRET), mask=m)
            else:
                tl.store(DX + off, store_val(gh, DX.dtype.element_ty, INTERPRET), mask=m)
    tl.store(DW_PART + pid * C + cols, dw, mask=m)
    if HAS_SCALE:
        tl.store(DS_PART + pid * C + cols, ds, mask=m)


@triton.jit
def _bwd_wide_kernel(DY, DH, X, H, S, W, RSTD, DX, DRES, DW_PART, DS_PART, M, C, rows_per_program,
                     HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, HAS_SCALE: tl.constexpr,
                     CHUNK: tl.constexpr, INTERPRET: tl.constexpr):
    """Two passes over each row in CHUNK tiles: mean(g * xhat), then the gradients; the program's
    partial dw / ds rows (its own slot, zeroed first) are updated in place."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    part = pid.to(tl.int64) * C
    for start in range(0, C, CHUNK):  # this program's partial rows start at zero (no zero-fill launch)
        cols = start + tl.arange(0, CHUNK)
        tl.store(DW_PART + part + cols, tl.zeros([CHUNK], dtype=tl.float32), mask=cols < C)
        if HAS_SCALE:
            tl.store(DS_PART + part + cols, tl.zeros([CHUNK], dtype=tl.float32), mask=cols < C)
    for i in range(0, rows_per_program):
        row = first + i
        if row < M:
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([CHUNK], dtype=tl.float32)
            for start in range(0, C, CHUNK):
                cols = start + tl.arange(0, CHUNK)
                m = cols < C
                hv = tl.load(H + row * C + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * C + cols, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
                acc += dy * w * hv
            dot = tl.sum(acc, axis=0) * rstd / C
            for start in range(0, C, CHUNK):
                cols = start + tl.arange(0, CHUNK)
                m = cols < C
                off = row * C + cols
                hv = tl.load(H + off, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
                xhat = hv * rstd
                gh = rstd * (dy * w - xhat * dot)
                pw = tl.load(DW_PART + part + cols, mask=m, other=0.0)
                tl.store(DW_PART + part + cols, pw + dy * xhat, mask=m)
                if HAS_DH:
                    gh += tl.load(DH + off, mask=m, other=0.0).to(tl.float32)
                if HAS_RES:
                    tl.store(DRES + off, store_val(gh, DRES.dtype.element_ty, INTERPRET), mask=m)
                    if HAS_SCALE:
                        xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
                        s = tl.load(S + cols, mask=m, other=0.0).to(tl.float32)
                        ps = tl.load(DS_PART + part + cols, mask=m, other=0.0)
                        tl.store(DS_PART + part + cols, ps + gh * xv, mask=m)
                        tl.store(DX + off, store_val(gh * s, DX.dtype.element_ty, INTERPRET), mask=m)
                else:
                    tl.store(DX + off, store_val(gh, DX.dtype.element_ty, INTERPRET), mask=m)


def _check_rows(*ts):
    check_dtype(*ts)
    for t in ts:
        assert t is None or t.is_contiguous(), "launchers take contiguous tensors"


def _launch_fwd(x, residual, x_scale, weight, y, h, rstd, eps, has_res):
    M, C = x.shape
    if not M or not C:
        return
    wide, B, nw = fwd_config(C)
    kernel = _fwd_wide_kernel if wide else _fwd_kernel
    kw = {"CHUNK": B} if wide else {"BLOCK": B}
    kernel[(M,)](x, residual, x_scale if x_scale is not None else x, weight, y, h, rstd, C, float(eps),
                 HAS_RES=has_res, HAS_SCALE=x_scale is not None, INTERPRET=INTERPRET, num_warps=nw, **kw)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C), weight (C,) -> (y (M, C) x.dtype, rstd (M,) fp32); y = x * rstd * weight."""
    _check_rows(x, weight)
    M, C = x.shape
    assert weight.shape == (C,)
    y = torch.empty_like(x)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    _launch_fwd(x, x, None, weight, y, y, rstd, eps, has_res=False)
    return y, rstd


def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = residual + x_scale * x (or residual + x); returns (rmsnorm(h) * weight, h, rstd (M,) fp32)."""
    _check_rows(x, residual, x_scale, weight)
    M, C = x.shape
    assert residual.shape == (M, C) and weight.shape == (C,) and (x_scale is None or x_scale.shape == (C,))
    y, h = torch.empty_like(x), torch.empty_like(residual)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    _launch_fwd(x, residual, x_scale, weight, y, h, rstd, eps, has_res=True)
    return y, h, rstd


def _bwd(dy, dh, x, h, x_scale, weight, rstd, has_res: bool):
    M, C = h.shape
    assert rstd.numel() == M and rstd.dtype == torch.float32
    P = reduction_programs(M, h.device) if M else 1
    rows = triton.cdiv(M, P) if M else 0
    # every program writes its own fp32 partial rows (no zero-fill); one column_sum launch finishes dw
    # (and dx_scale, the second slab) in the parameters' dtype
    part = torch.empty(2 if x_scale is not None else 1, P, C, device=h.device, dtype=torch.float32)
    dw_part, ds_part = part[0], part[-1]
    dres = torch.empty_like(h) if has_res else None
    dx = dres if has_res and x_scale is None else torch.empty_like(x)  # unscaled: dx is dresidual
    dres = dx if dres is None else dres
    if M and C:
        wide, B, nw = bwd_config(C)
        kernel = _bwd_wide_kernel if wide else _bwd_kernel
        kw = {"CHUNK": B} if wide else {"BLOCK": B}
        kernel[(P,)](dy, dh if dh is not None else dy, x, h, x_scale if x_scale is not None else weight,
                     weight, rstd, dx, dres, dw_part, ds_part, M, C, rows,
                     HAS_RES=has_res, HAS_DH=dh is not None, HAS_SCALE=x_scale is not None,
                     INTERPRET=INTERPRET, num_warps=nw, **kw)
    if not (M and C):
        part.zero_()
    sums = column_sum(part, weight.dtype, *((x_scale.dtype,) if x_scale is not None else ()))
    return dx, dres, sums[0], (sums[1] if x_scale is not None else None)


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx (M, C) x.dtype, dweight (C,) weight.dtype)."""
    _check_rows(dy, x, weight, rstd)
    dx, _, dw, _ = _bwd(dy, None, x, x, None, weight, rstd, has_res=False)
    return dx, dw


def add_rms_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, h: torch.Tensor,
                     x_scale: torch.Tensor | None, weight: torch.Tensor, rstd: torch.Tensor):
    """-> (dx, dresidual, dweight, dx_scale or None); without x_scale dx is dresidual (one tensor)."""
    _check_rows(dy, dh, x, h, x_scale, weight, rstd)
    dx, dres, dw, ds = _bwd(dy, dh, x, h, x_scale, weight, rstd, has_res=True)
    return (dres if x_scale is None else dx), dres, dw, ds


REAL_WIDTHS = (768, 1024, 1280, 1536, 2432)  # the model's norms run at its embedding width
WIDE = (9728,)  # the 5B FFN width: the chunked kernels


def shipped_configs(dtypes=(torch.bfloat16, torch.float16), widths=REAL_WIDTHS + WIDE):
    """Every (kernel, constexpr, num_warps) combination the launchers pick at ``widths``."""
    from ._aot import entry as config

    out, seen = [], set()
    for dt in dtypes:
        for C in widths:
            fwd, bwd = fwd_config(C), bwd_config(C)
            for res, scale in ((False, False), (True, False), (True, True)):
                wide, B, nw = fwd
                key = ("fwd", dt, fwd, res, scale)
                if key not in seen:
                    seen.add(key)
                    out.append(config(f"rms_norm_fwd{'_wide' if wide else ''}[{SHORT[dt]},{'CHUNK' if wide else 'BLOCK'}={B},res={res},scale={scale}]",
                                      _fwd_wide_kernel if wide else _fwd_kernel,
                                      {"X": dt, "R": dt, "S": dt, "W": dt, "Y": dt, "H": dt, "RSTD": torch.float32,
                                       "C": "i32", "eps": "fp32"},
                                      {"HAS_RES": res, "HAS_SCALE": scale, ("CHUNK" if wide else "BLOCK"): B,
                                       "INTERPRET": False}, nw))
                wide, B, nw = bwd
                for has_dh in ((False, True) if res else (False,)):
                    key = ("bwd", dt, bwd, res, scale, has_dh)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(config(f"rms_norm_bwd{'_wide' if wide else ''}[{SHORT[dt]},{'CHUNK' if wide else 'BLOCK'}={B},res={res},scale={scale},dh={has_dh}]",
                                      _bwd_wide_kernel if wide else _bwd_kernel,
                                      {"DY": dt, "DH": dt, "X": dt, "H": dt, "S": dt, "W": dt, "RSTD": torch.float32,
                                       "DX": dt, "DRES": dt, "DW_PART": torch.float32, "DS_PART": torch.float32,
                                       "M": "i32", "C": "i32", "rows_per_program": "i32"},
                                      {"HAS_RES": res, "HAS_DH": has_dh, "HAS_SCALE": scale,
                                       ("CHUNK" if wide else "BLOCK"): B, "INTERPRET": False}, nw))
    return out
