"""Attention at the real Sapiens2 shapes: FLOPs executed, HBM bytes and H100 roofline time of our
kernels beside flash-attention 2 and FlexAttention, each counted from its launch plan by the same
rules (``sapiens2/ops/plan.py``).

Each library gets its native layout and real tiles: ours and flash-attn take ``(B, N, H, D)``
(flash-attn pads a head dim to a multiple of 8 with copies: 76 -> 80, and runs its 96-wide template
for 80), FlexAttention any strides with no copies (the head dim padded to a power of two in
registers: 76 and 80 compute 128). Ours keeps the true head dim in memory and tiles 76/80 as
64 + 16. Backward GEMMs: ours 5 (dQ by atomics) or 7 (deterministic), flash-attn 5, FlexAttention 7.
"""

from __future__ import annotations

import torch

from .device import H100_SXM


def _totals(plan) -> dict:
    flops = sum(ln.flops for ln in plan.launches)
    nbytes = sum(ln.bytes_read + ln.bytes_written for ln in plan.launches)
    t = sum(max(ln.flops / H100_SXM.bf16_flops, (ln.bytes_read + ln.bytes_written) / H100_SXM.hbm_bytes_per_s)
            for ln in plan.launches)
    return {"flops": flops, "bytes": nbytes, "roofline_s": t, "kernels": len(plan.launches)}


def our_plans(B: int, N: int, H: int, Hkv: int, D: int, deterministic: bool = False):
    from ..ops.plan import plan_for

    m = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = torch.empty(B, N, H, D, **m), torch.empty(B, N, Hkv, D, **m), torch.empty(B, N, Hkv, D, **m)
    o, lse = torch.empty(B, N, H, D, **m), torch.empty(B, H, N, device="meta")
    args = (None, None, None, None, 0, None, D ** -0.5, 1e-6)
    fwd = plan_for("sapiens2::attention", "triton")(q, k, v, *args, deterministic)
    bwd = plan_for("sapiens2::attention_backward", "triton")(o, q, k, v, o, lse, *args, deterministic)
    return fwd, bwd


def attention_cost(B: int, N: int, H: int, Hkv: int, D: int, library: str = "ours") -> dict:
    from .plans_official import flash_attn_plans, flash_head_dim, flex_plans

    if library == "ours":
        fwd, bwd = our_plans(B, N, H, Hkv, D)
        from ..ops.launch_plans import _tile_d

        tiles = _tile_d(D)
    elif library == "ours-deterministic":
        fwd, bwd = our_plans(B, N, H, Hkv, D, deterministic=True)
        from ..ops.launch_plans import _tile_d

        tiles = _tile_d(D)
    elif library == "flash-attn":
        fwd, bwd = flash_attn_plans(B, N, H, Hkv, D)
        tiles = flash_head_dim(D)
    elif library == "flex-attention":
        fwd, bwd = flex_plans(B, N, H, Hkv, D)
        tiles = 1 << (D - 1).bit_length()
    else:
        raise ValueError(f"unknown library {library!r}")
    f, b = _totals(fwd), _totals(bwd)
    return {"library": library, "B": B, "N": N, "H": H, "Hkv": Hkv, "D": D, "D_in_tiles": tiles,
            "fwd_flops": f["flops"], "fwd_bytes": f["bytes"], "fwd_kernels": f["kernels"], "fwd_roofline_s": f["roofline_s"],
            "bwd_flops": b["flops"], "bwd_bytes": b["bytes"], "bwd_kernels": b["kernels"], "bwd_roofline_s": b["roofline_s"],
            "bwd_over_fwd_flops": b["flops"] / f["flops"]}


SHAPES = [("sapiens2_0.4b", 16, 8, 64), ("sapiens2_0.8b", 16, 8, 80), ("sapiens2_5b", 32, 16, 76)]
LIBRARIES = ("ours", "ours-deterministic", "flash-attn", "flex-attention")


def attention_table(N: int = 3081, B: int = 8) -> list[dict]:
    """One row per (variant head dim, library) at N tokens, GQA ratio 2 (the GQA layers' shapes)."""
    rows = []
    for arch, H, Hkv, D in SHAPES:
        for lib in LIBRARIES:
            r = attention_cost(B, N, H, Hkv, D, lib)
            r["arch"] = arch
            rows.append(r)
    return rows


def head_dim_layouts(B: int = 8, N: int = 3081, H: int = 32, Hkv: int = 16, C: int = 2432,
                     slots=(76, 80)) -> list[dict]:
    """The 5B's GQA attention layer (32 query heads, 16 K/V heads, D = 76) with its packed q/k/v
    projection writing head rows of each ``slot`` width: 76 (the true dim, 152-byte rows) or 80
    (zero weight rows, 160-byte rows that allow 16-byte loads). Per layer, forward + backward:
    the projection GEMMs (forward, dX, dW) and the attention kernels at that row width (our plans
    at D = slot; FLOPs are the same, the 76 kernels already compute 80-wide tiles)."""
    rows = []
    for slot in slots:
        out = (H + 2 * Hkv) * slot
        x, w, y = B * N * C * 2, out * C * 2, B * N * out * 2
        gemm_flops = 3 * 2 * B * N * C * out
        gemm_bytes = (x + w + y) + (y + w + x) + (y + x + w)  # fwd, dX = dY W, dW = dY^T X
        gemm_s = sum(max(2 * B * N * C * out / H100_SXM.bf16_flops, b / H100_SXM.hbm_bytes_per_s)
                     for b in (x + w + y, y + w + x, y + x + w))
        a = attention_cost(B, N, H, Hkv, slot, "ours")
        rows.append({"slot": slot, "qkv_gemm_flops": gemm_flops, "qkv_gemm_bytes": gemm_bytes, "qkv_gemm_s": gemm_s,
                     "attn_bytes": a["fwd_bytes"] + a["bwd_bytes"], "attn_flops": a["fwd_flops"] + a["bwd_flops"],
                     "attn_s": a["fwd_roofline_s"] + a["bwd_roofline_s"],
                     "total_s": gemm_s + a["fwd_roofline_s"] + a["bwd_roofline_s"]})
    return rows
