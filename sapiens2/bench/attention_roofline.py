"""Attention at the real Sapiens2 shapes: FLOPs, HBM bytes and roofline-bound H100 time of our
kernel (true head dim) beside flash-attention / FlexAttention run on padded head dims.

Libraries that only support fixed head dims pad 76 (5B) and 80 (0.8B): flash-attention 2/3
(supported dims 64, 96, 128, ...) to 96, FlexAttention (power-of-two tiles) to 128. Padding
costs twice: the matmuls run on the padded dim, and q, k, v must be copied into padded buffers
(and the output sliced back) around the call. Counted the same way for every side: forward reads
q, k, v once and writes o and the fp32 log-sum-exp; backward reads q, k, v, o, dO, lse and
writes dq, dk, dv (FLOPs: 2.5x forward, recomputation included, as PyTorch counts SDPA).
"""

from __future__ import annotations

from .device import H100_SXM, roofline_seconds

BF16 = 2


def ours_tile_dim(D: int) -> int:
    """Head dim our kernel's tensor-core tiles cover: a power-of-two tile plus a 16-wide remainder
    tile (76 -> 64 + 16), so only the tiles are padded, never memory."""
    if D & (D - 1) == 0:
        return D
    return (1 << (D.bit_length() - 1)) + ((D - (1 << (D.bit_length() - 1)) + 15) // 16) * 16


def padded_dim(D: int, library: str) -> int:
    if library == "ours":
        return ours_tile_dim(D)
    if library in ("flash-attn", "flash-attn-3"):
        return next(d for d in (32, 64, 96, 128, 160, 192, 224, 256) if d >= D)
    if library == "flex-attention":
        return 1 << (D - 1).bit_length()
    raise ValueError(f"unknown library {library!r}")


def attention_cost(B: int, N: int, H: int, Hkv: int, D: int, library: str = "ours") -> dict:
    Dp = padded_dim(D, library)
    fwd_flops = 4 * B * H * N * N * Dp
    q, kv, lse = B * N * H * Dp * BF16, B * N * Hkv * Dp * BF16, B * H * N * 4
    fwd_bytes = q + 2 * kv + q + lse  # read q, k, v; write o, lse
    bwd_bytes = (q + 2 * kv + q + q + lse) + (q + 2 * kv)  # read q, k, v, o, dO, lse; write dq, dk, dv
    pad_bytes = 0
    if library == "ours":  # tiles are padded in registers only: memory holds the true head dim
        q, kv = B * N * H * D * BF16, B * N * Hkv * D * BF16
        fwd_bytes = q + 2 * kv + q + lse
        bwd_bytes = (q + 2 * kv + q + q + lse) + (q + 2 * kv)
    elif Dp != D:  # copy q, k, v into padded buffers and slice the output back (and the grads in backward)
        true_q, true_kv = B * N * H * D * BF16, B * N * Hkv * D * BF16
        pad_fwd = (true_q + 2 * true_kv) + (q + 2 * kv) + q + true_q
        pad_bytes = pad_fwd * 2
    return {
        "library": library, "B": B, "N": N, "H": H, "Hkv": Hkv, "D": D, "D_computed": Dp,
        "fwd_flops": fwd_flops, "fwd_bytes": fwd_bytes + pad_bytes // 2,
        "bwd_flops": fwd_flops * 5 // 2, "bwd_bytes": bwd_bytes + pad_bytes // 2,
        "fwd_roofline_s": roofline_seconds(fwd_flops, fwd_bytes + pad_bytes // 2, H100_SXM),
        "bwd_roofline_s": roofline_seconds(fwd_flops * 5 // 2, bwd_bytes + pad_bytes // 2, H100_SXM),
    }


def attention_table(N: int = 3081, B: int = 8) -> list[dict]:
    """One row per (variant head dim, library) at N tokens: the real Sapiens2 attention shapes."""
    shapes = [("sapiens2_0.4b", 16, 8, 64), ("sapiens2_0.8b", 16, 8, 80), ("sapiens2_5b", 32, 16, 76)]
    rows = []
    for arch, H, Hkv, D in shapes:
        for lib in ("ours", "flash-attn", "flex-attention"):
            r = attention_cost(B, N, H, Hkv, D, lib)
            r["arch"] = arch
            rows.append(r)
    return rows
