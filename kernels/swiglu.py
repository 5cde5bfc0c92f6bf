"""SwiGLU on the fused ``w12`` output, forward and backward, on a 2D grid (rows x column tiles).

Forward::      a, b = x12[:, :F], x12[:, F:];   y = a * sigmoid(a) * b
Backward (the sigmoid recomputed from the saved input, nothing else kept)::

    s = sigmoid(a);   da = dy * b * s * (1 + a * (1 - s));   db = dy * a * s

Column tiles (not one program per row) keep the register footprint fixed for any F (up to 9728
for the 5B model: 19456 inputs per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .column_sum import column_sum
from ._common import INTERPRET, SHORT, check_dtype, round_to, store_val

BLOCK_F = 1024
NUM_WARPS = 4


@triton.jit
def _fwd_kernel(X12, Y, F, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    a = tl.load(X12 + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * F + cols, store_val(y, Y.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def _bwd_kernel(DY, X12, DX12, F, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    a = tl.load(X12 + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    tl.store(DX12 + row * 2 * F + cols, store_val(da, DX12.dtype.element_ty, INTERPRET), mask=m)
    tl.store(DX12 + row * 2 * F + F + cols, store_val(db, DX12.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def _recompute_bwd_kernel(DS, X12, S, DX12, DB_PART, M, F, rows_per_program, BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, INTERPRET: tl.constexpr, WRITE_S: tl.constexpr = True):
    """FFN backward pass over x12: s = swiglu(x12) (for dW3; skipped when the caller kept s,
    ``WRITE_S=False``), dx12, and per-program partial sums of dx12 over this program's rows (the w12
    bias gradient): one read of x12 and ds, one write of s and dx12."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    da_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < M:
            a = tl.load(X12 + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
            b = tl.load(X12 + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(DS + row * F + cols, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(a)
            da = g * b * sg * (1.0 + a * (1.0 - sg))
            db = g * a * sg
            if WRITE_S:
                tl.store(S + row * F + cols, store_val(a * sg * b, S.dtype.element_ty, INTERPRET), mask=m)
            da = round_to(da, DX12.dtype.element_ty, INTERPRET)  # the bias gradient sums what is stored
            db = round_to(db, DX12.dtype.element_ty, INTERPRET)
            tl.store(DX12 + row * 2 * F + cols, store_val(da, DX12.dtype.element_ty, INTERPRET), mask=m)
            tl.store(DX12 + row * 2 * F + F + cols, store_val(db, DX12.dtype.element_ty, INTERPRET), mask=m)
            if BIAS:
                da_acc += da
                db_acc += db
    if BIAS:
        part = DB_PART + tl.program_id(0).to(tl.int64) * 2 * F
        tl.store(part + cols, da_acc, mask=m)
        tl.store(part + F + cols, db_acc, mask=m)


def _grid(M: int, F: int):
    return (M, triton.cdiv(F, BLOCK_F))


def swiglu_fwd(x12: torch.Tensor) -> torch.Tensor:
    """x12 (M, 2F) contiguous -> y (M, F)."""
    check_dtype(x12)
    assert x12.is_contiguous()
    M, F2 = x12.shape
    F = F2 // 2
    y = torch.empty(M, F, device=x12.device, dtype=x12.dtype)
    if M and F:
        _fwd_kernel[_grid(M, F)](x12, y, F, BLOCK=BLOCK_F, INTERPRET=INTERPRET, num_warps=NUM_WARPS)
    return y


def swiglu_bwd(dy: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    """dy (M, F), x12 (M, 2F) -> dx12 (M, 2F)."""
    check_dtype(dy, x12)
    assert dy.is_contiguous() and x12.is_contiguous()
    M, F2 = x12.shape
    dx12 = torch.empty_like(x12)
    if M and F2:
        _bwd_kernel[_grid(M, F2 // 2)](dy, x12, dx12, F2 // 2, BLOCK=BLOCK_F, INTERPRET=INTERPRET, num_warps=NUM_WARPS)
    return dx12


def _recompute_pass(ds: torch.Tensor, x12: torch.Tensor, bias_grad: bool, write_s: bool):
    """One launch of ``_recompute_bwd_kernel``: (s or None, dx12, db12 or empty)."""
    check_dtype(ds, x12)
    assert ds.is_contiguous() and x12.is_contiguous()
    M, F2 = x12.shape
    F = F2 // 2
    s = torch.empty(M, F, device=x12.device, dtype=x12.dtype) if write_s else None
    dx12 = torch.empty_like(x12)
    sms = torch.cuda.get_device_properties(x12.device).multi_processor_count if x12.is_cuda else 8
    cols = triton.cdiv(F, BLOCK_F) if F else 1
    P = max(1, min(M, triton.cdiv(4 * sms, cols))) if bias_grad else M  # row blocks
    # each program writes its fp32 partial row of the bias gradient; one column_sum launch finishes it
    part = torch.empty(P if bias_grad else 1, F2, device=x12.device, dtype=torch.float32)
    if M and F:
        _recompute_bwd_kernel[(P, cols)](ds, x12, s if write_s else dx12, dx12, part, M, F, triton.cdiv(M, P),
                                         BIAS=bias_grad, BLOCK=BLOCK_F, INTERPRET=INTERPRET, WRITE_S=write_s,
                                         num_warps=NUM_WARPS)
    elif bias_grad:
        part.zero_()
    db = column_sum(part[None], x12.dtype)[0] if bias_grad else x12.new_empty(0)
    return s, dx12, db


def swiglu_recompute_bwd(ds: torch.Tensor, x12: torch.Tensor, bias_grad: bool):
    """ds (M, F), x12 (M, 2F) -> (s (M, F), dx12 (M, 2F), db12 (2F,) or empty)."""
    return _recompute_pass(ds, x12, bias_grad, write_s=True)


def swiglu_bias_bwd(ds: torch.Tensor, x12: torch.Tensor):
    """ds (M, F), x12 (M, 2F) -> (dx12 (M, 2F), db12 (2F,)): the recompute pass without writing s
    (for callers that kept the hidden activation)."""
    _, dx12, db = _recompute_pass(ds, x12, True, write_s=False)
    return dx12, db


def shipped_configs(dtypes=(torch.bfloat16, torch.float16)):
    from ._aot import entry

    out = []
    for dt in dtypes:
        cx = {"BLOCK": BLOCK_F, "INTERPRET": False}
        out.append(entry(f"swiglu_fwd[{SHORT[dt]}]", _fwd_kernel, {"X12": dt, "Y": dt, "F": "i32"}, cx, NUM_WARPS))
        out.append(entry(f"swiglu_bwd[{SHORT[dt]}]", _bwd_kernel, {"DY": dt, "X12": dt, "DX12": dt, "F": "i32"}, cx, NUM_WARPS))
        for bias in (False, True):
            out.append(entry(f"swiglu_recompute_bwd[{SHORT[dt]},bias={bias}]", _recompute_bwd_kernel,
                             {"DS": dt, "X12": dt, "S": dt, "DX12": dt, "DB_PART": torch.float32, "M": "i32",
                              "F": "i32", "rows_per_program": "i32"}, {**cx, "BIAS": bias, "WRITE_S": True}, NUM_WARPS))
        out.append(entry(f"swiglu_bias_bwd[{SHORT[dt]}]", _recompute_bwd_kernel,
                         {"DS": dt, "X12": dt, "S": dt, "DX12": dt, "DB_PART": torch.float32, "M": "i32",
                          "F": "i32", "rows_per_program": "i32"}, {**cx, "BIAS": True, "WRITE_S": False}, NUM_WARPS))
    return out
