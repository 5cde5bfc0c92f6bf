"""Shipped-config entries for the ahead-of-time compile gate (``kernels/compile_gate.py``).

An entry describes one specialisation the launchers can pick: the ``@triton.jit`` function, the
type of every runtime argument, the constexpr values, and launch options. Pointer arguments are
marked 16-byte aligned, as the runtime JIT specialises them for torch allocations; compiling
without that gives unvectorised code that never runs.
"""

from __future__ import annotations

import torch

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
        torch.int64: "*i64", torch.bool: "*i1"}


def signature(fn, types: dict, constexprs: dict) -> dict:
    """``{arg: type string}`` over ``fn``'s arguments; constexpr arguments marked ``"constexpr"``."""
    return {a: "constexpr" if a in constexprs else types[a] for a in fn.arg_names}


def entry(name: str, fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 1) -> dict:
    """One shipped config; ``types`` maps arguments to torch dtypes (pointers) or "i32"/"fp32"/... strings."""
    types = {k: _PTR[v] if isinstance(v, torch.dtype) else v for k, v in types.items()}
    sig = signature(fn, types, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    return {"name": name, "fn": fn, "signature": sig, "constexprs": dict(constexprs), "attrs": attrs,
            "num_warps": num_warps, "num_stages": num_stages}
