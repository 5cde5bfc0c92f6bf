"""Column sums of fp32 partial-sum buffers, written in the parameter's dtype: one launch.

The kernels that produce a weight or bias gradient (RMSNorm, SwiGLU's bias, QK-norm, window
attention's q/k/v bias) write one fp32 row of partial sums per program, without atomics; this
kernel finishes them: ``out[s, c] = sum_r part[s, r, c]`` for every slab ``s`` (dw and dx_scale of
one norm in a single launch), accumulated in fp32 in a fixed order (deterministic) and rounded once
to ``out``'s dtype. It replaces ``part.sum(0)`` + ``.to(dtype)`` (two launches, and a zero-fill
before the producer). One program per (32 columns, slab) walks all rows, 64 at a time: the buffers
are at most a few MB and L2-resident right after the producer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SHORT, store_val

BLOCK_R, BLOCK_C = 64, 32


@triton.jit
def _column_sum_kernel(PART, OUT0, OUT1, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """Slab ``program_id(1)`` (0 or 1) of PART summed over its rows into OUT0 or OUT1 (separate tensors:
    an op's outputs may not alias)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1)
    cm = c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = PART + s.to(tl.int64) * R * C
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & cm[None, :]
        acc += tl.sum(tl.load(base + r[:, None].to(tl.int64) * C + c[None, :], mask=m, other=0.0), axis=0)
    if s == 0:
        tl.store(OUT0 + c, store_val(acc, OUT0.dtype.element_ty, INTERPRET), mask=cm)
    else:
        tl.store(OUT1 + c, store_val(acc, OUT1.dtype.element_ty, INTERPRET), mask=cm)


def column_sum(part: torch.Tensor, *dtypes: torch.dtype, outs=None) -> tuple[torch.Tensor, ...]:
    """``part`` (S, R, C) fp32 contiguous, S = 1 or 2 -> S tensors (C,): each slab summed over its rows,
    slab ``i`` in ``dtypes[i]`` (one dtype for all when one is given), or into the contiguous ``outs``."""
    assert part.dtype == torch.float32 and part.is_contiguous() and part.dim() == 3 and part.shape[0] in (1, 2), \
        "column_sum takes a contiguous fp32 (1 or 2, rows, columns) buffer"
    S, R, C = part.shape
    dts = dtypes * S if len(dtypes) == 1 else dtypes
    if outs is None:
        outs = [torch.empty(C, device=part.device, dtype=dt) for dt in dts]
    assert len(outs) == S and all(o.shape == (C,) and o.is_contiguous() for o in outs)
    if C:
        _column_sum_kernel[(triton.cdiv(C, BLOCK_C), S)](part, outs[0], outs[-1], R, C, BLOCK_R=BLOCK_R,
                                                         BLOCK_C=BLOCK_C, INTERPRET=INTERPRET, num_warps=4)
    return tuple(outs)


def shipped_configs(dtypes=(torch.bfloat16, torch.float16)):
    from ._aot import entry

    return [entry(f"column_sum[{SHORT[dt]}]", _column_sum_kernel,
                  {"PART": torch.float32, "OUT0": dt, "OUT1": dt, "R": "i32", "C": "i32"},
                  {"BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C, "INTERPRET": False}, 4) for dt in (*dtypes, torch.float32)]
