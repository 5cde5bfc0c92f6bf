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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_dtype, num_warps_for, round_to, store_val

MAX_WIDTH = 65536


def _block(C: int) -> int:
    if C > MAX_WIDTH:
        raise ValueError(f"RMSNorm width {C} exceeds the kernel's limit of {MAX_WIDTH}")
    return triton.next_power_of_2(C)


def _backward_programs(M: int, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(M, 4 * sms))


@triton.jit
def _fwd_kernel(X, R, S, W, Y, H, RSTD, C, eps, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    x = tl.load(X + row * C + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        if HAS_SCALE:
            s = tl.load(S + cols, mask=m, other=0.0).to(tl.float32)
            x = round_to(x * s, X.dtype.element_ty, INTERPRET)  # same roundings as residual + x * s
        x = tl.load(R + row * C + cols, mask=m, other=0.0).to(tl.float32) + x
        x = round_to(x, H.dtype.element_ty, INTERPRET)
        tl.store(H + row * C + cols, store_val(x, H.dtype.element_ty, INTERPRET), mask=m)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    tl.store(RSTD + row, rstd)
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


def _check_rows(*ts):
    check_dtype(*ts)
    for t in ts:
        assert t is None or t.is_contiguous(), "launchers take contiguous tensors"


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x (M, C) -> (y (M, C), rstd (M,) fp32)."""
    _check_rows(x, weight)
    M, C = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M:
        B = _block(C)
        _fwd_kernel[(M,)](x, x, x, weight, y, y, rstd, C, eps, HAS_RES=False, HAS_SCALE=False, BLOCK=B,
                          INTERPRET=INTERPRET, num_warps=num_warps_for(B))
    return y, rstd


def add_rms_norm_fwd(x, residual, x_scale, weight, eps: float):
    """h = residual + x_scale * x; returns (rmsnorm(h) * weight, h, rstd)."""
    _check_rows(x, residual, x_scale, weight)
    M, C = x.shape
    y, h = torch.empty_like(x), torch.empty_like(residual)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M:
        B = _block(C)
        _fwd_kernel[(M,)](x, residual, x_scale if x_scale is not None else x, weight, y, h, rstd, C, eps,
                          HAS_RES=True, HAS_SCALE=x_scale is not None, BLOCK=B, INTERPRET=INTERPRET,
                          num_warps=num_warps_for(B))
    return y, h, rstd


def _bwd(dy, dh, x, h, x_scale, weight, rstd, has_res: bool):
    M, C = h.shape
    B = _block(C)
    P = _backward_programs(M, h.device) if M else 1
    rows = triton.cdiv(M, P) if M else 0
    dw_part = torch.zeros(P, C, device=h.device, dtype=torch.float32)
    ds_part = torch.zeros(P, C, device=h.device, dtype=torch.float32) if x_scale is not None else dw_part
    dres = torch.empty_like(h) if has_res else None
    dx = dres if has_res and x_scale is None else torch.empty_like(x)  # unscaled: dx is dresidual
    dres = dx if dres is None else dres
    if M:
        _bwd_kernel[(P,)](dy, dh if dh is not None else dy, x, h, x_scale if x_scale is not None else weight,
                          weight, rstd, dx, dres, dw_part, ds_part, M, C, rows,
                          HAS_RES=has_res, HAS_DH=dh is not None, HAS_SCALE=x_scale is not None, BLOCK=B,
                          INTERPRET=INTERPRET, num_warps=num_warps_for(B))
    dw = dw_part.sum(0).to(weight.dtype)
    ds = ds_part.sum(0).to(x_scale.dtype) if x_scale is not None else None
    return dx, dres, dw, ds


def rms_norm_bwd(dy, x, weight, rstd):
    """-> (dx, dweight)."""
    _check_rows(dy, x, weight)
    dx, _, dw, _ = _bwd(dy, None, x, x, None, weight, rstd, has_res=False)
    return dx, dw


def add_rms_norm_bwd(dy, dh, x, h, x_scale, weight, rstd):
    """-> (dx, dresidual, dweight, dx_scale or None); without x_scale dx is dresidual (one tensor)."""
    _check_rows(dy, dh, x, h, x_scale, weight)
    dx, dres, dw, ds = _bwd(dy, dh, x, h, x_scale, weight, rstd, has_res=True)
    return (dres if x_scale is None else dx), dres, dw, ds


REAL_WIDTHS = (768, 1024, 1280, 1536, 2432)  # the model's norms run at its embedding width
WIDE = (9728,)  # supported (and tested) but its backward spills registers on sm_90a: see the README


def shipped_configs(dtypes=(torch.bfloat16, torch.float16), widths=REAL_WIDTHS):
    """Every (kernel, constexpr) combination the launchers pick at ``widths``."""
    from ._aot import entry as config

    out = []
    for dt in dtypes:
        for C in widths:
            B = triton.next_power_of_2(C)
            nw = num_warps_for(B)
            for res, scale in ((False, False), (True, False), (True, True)):
                out.append(config(f"rms_norm_fwd[C={C},res={res},scale={scale}]", _fwd_kernel,
                                  {"X": dt, "R": dt, "S": dt, "W": dt, "Y": dt, "H": dt, "RSTD": torch.float32,
                                   "C": "i32", "eps": "fp32"},
                                  {"HAS_RES": res, "HAS_SCALE": scale, "BLOCK": B, "INTERPRET": False}, nw))
                for has_dh in ((False, True) if res else (False,)):
                    out.append(config(f"rms_norm_bwd[C={C},res={res},scale={scale},dh={has_dh}]", _bwd_kernel,
                                      {"DY": dt, "DH": dt, "X": dt, "H": dt, "S": dt, "W": dt, "RSTD": torch.float32,
                                       "DX": dt, "DRES": dt, "DW_PART": torch.float32, "DS_PART": torch.float32,
                                       "M": "i32", "C": "i32", "rows_per_program": "i32"},
                                      {"HAS_RES": res, "HAS_DH": has_dh, "HAS_SCALE": scale, "BLOCK": B,
                                       "INTERPRET": False}, nw))
    return out
