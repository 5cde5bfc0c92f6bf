"""Helpers shared by the Triton kernels: interpreter detection, block-size / warp choice, dtype maps
and dtype-faithful rounding.

Under ``TRITON_INTERPRET=1`` (CPU tensors) bf16 arithmetic is not emulated and fp32 -> bf16
conversion truncates, so the kernels load every operand as fp32 (exact), compute in fp32, and
round values meant for a bf16 tensor with round-to-nearest-even done on the bits, as the GPU
conversion does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: torch dtype -> Triton language dtype
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
#: torch dtype -> pointer type string of an ``ASTSource`` signature (the compile gate)
PTR_SIG = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
           torch.int64: "*i64", torch.bool: "*i1"}
#: short names for config labels
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def row_block(C: int) -> int:
    """One power-of-two block covering a row of ``C`` elements (masked past ``C``)."""
    return triton.next_power_of_2(max(int(C), 1))


H100_SMS = 132


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``: the GPU's; 132 (an H100 SXM) on the meta device, for the cost
    model; 8 on the CPU, the interpreter's stand-in."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS if device.type == "meta" else 8


def reduction_programs(rows: int, device: torch.device, per_sm: int = 4, min_rows: int = 16) -> int:
    """Programs for a kernel that reduces over rows with per-program partial sums: up to a few per SM,
    but each with at least ``min_rows`` rows (every program writes a partial row that is read back:
    at batch 1 x 3081 tokens, 4 per SM would move as many partial bytes as a third of the rows),
    and at least one per SM; never more than there are rows."""
    sms = sm_count(device)
    return max(1, min(int(rows), per_sm * sms, max(sms, -(-int(rows) // min_rows))))


def num_warps_for(block: int) -> int:
    """Warps for a row-wise kernel over ``block`` elements (Liger-Kernel's rule of thumb)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise NotImplementedError(f"Triton kernels take float32/float16/bfloat16, got {t.dtype}")


@triton.jit
def rne_bf16(x):
    """fp32 values rounded to the nearest bf16-representable value (ties to even), kept as fp32."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded as a store into ``DTYPE`` would round it, returned as fp32."""
    if DTYPE == tl.float32:
        y = x
    elif INTERPRET and DTYPE == tl.bfloat16:
        y = rne_bf16(x)
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def store_val(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` converted for a store into a ``DTYPE`` tensor (exact rounding under the interpreter)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        y = rne_bf16(x).to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def as_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 tile as a tensor-core operand (or a store value) of ``DTYPE``; under the interpreter
    the value stays fp32, rounded as the conversion would round it."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            y = rne_bf16(x)
        elif DTYPE == tl.float16:
            y = x.to(tl.float16).to(tl.float32)
        else:
            y = x
    else:
        y = x.to(DTYPE)
    return y
