"""``sapiens2 bench attention``: attention at the real shapes from each library's launch plan (ours,
ours deterministic, flash-attn 2, FlexAttention), and the head-dim-76 layout trade of the 5B."""

from __future__ import annotations

import json

from .attention_roofline import attention_table, head_dim_layouts
from .report import md_table

COLUMNS = ["variant", "library", "D", "D in tiles", "fwd TFLOP", "fwd GB", "fwd ms", "bwd TFLOP", "bwd GB",
           "bwd kernels", "bwd ms", "bwd/fwd FLOPs"]


def attention_rows(B: int, N: int) -> list[list[str]]:
    return [[r["arch"].replace("sapiens2_", ""), r["library"], str(r["D"]), str(r["D_in_tiles"]),
             f"{r['fwd_flops'] / 1e12:.3f}", f"{r['fwd_bytes'] / 1e9:.3f}", f"{r['fwd_roofline_s'] * 1e3:.3f}",
             f"{r['bwd_flops'] / 1e12:.3f}", f"{r['bwd_bytes'] / 1e9:.3f}", str(r["bwd_kernels"]),
             f"{r['bwd_roofline_s'] * 1e3:.3f}", f"{r['bwd_over_fwd_flops']:.2f}"] for r in attention_table(N, B)]


LAYOUT_COLUMNS = ["q/k/v head rows", "projection TFLOP", "projection GB", "projection ms", "attention GB",
                  "attention ms", "layer total ms"]


def layout_rows(B: int, N: int) -> list[list[str]]:
    return [[f"{r['slot']} wide ({2 * r['slot']} B)", f"{r['qkv_gemm_flops'] / 1e12:.3f}",
             f"{r['qkv_gemm_bytes'] / 1e9:.3f}", f"{r['qkv_gemm_s'] * 1e3:.3f}", f"{r['attn_bytes'] / 1e9:.3f}",
             f"{r['attn_s'] * 1e3:.3f}", f"{r['total_s'] * 1e3:.3f}"] for r in head_dim_layouts(B, N)]


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    return md_table([dict(zip(columns, r)) for r in rows], columns).rstrip("\n")


def add_attention_parser(subparsers) -> None:
    p = subparsers.add_parser("attention", help="attention roofline: ours vs flash-attn vs FlexAttention; D=76 layouts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=3081)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_attention)


def run_attention(args) -> int:
    if args.json:
        print(json.dumps({"attention": attention_table(args.tokens, args.batch),
                          "head_dim_76_layouts": head_dim_layouts(args.batch, args.tokens)}, indent=1))
        return 0
    print(f"Attention, batch {args.batch}, N = {args.tokens}, GQA 2, bf16, H100 roofline per kernel "
          f"(max of FLOPs / 989.4 TFLOP/s and bytes / 3.35 TB/s):\n")
    print(markdown(COLUMNS, attention_rows(args.batch, args.tokens)))
    print(f"\nThe 5B's attention layer (32 x 76 query heads, GQA 2, C = 2432), forward + backward, batch "
          f"{args.batch}: q/k/v projection writing 76-wide head rows or 80-wide zero-padded ones:\n")
    print(markdown(LAYOUT_COLUMNS, layout_rows(args.batch, args.tokens)))
    return 0
