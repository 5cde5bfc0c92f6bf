"""``sapiens2 bench cost``: memory traffic, kernels, FLOPs and bytes kept for backward of one block
(or the 4K tokenizer stage, or one pretraining step: ``pretrain_cost.py``), ours vs the official code
as PyTorch runs it on a GPU."""

from __future__ import annotations

import json

from .cost import block_costs, compare, forward_stage_share, tokenizer_costs

ROWS = [("bytes", "bytes moved (fwd+bwd)"), ("bytes_outside_matmul", "  outside matmuls/attention"),
        ("kernels", "kernel launches"), ("flops", "FLOPs"), ("saved_bytes", "bytes kept for backward"),
        ("roofline_s", "H100 roofline time")]


def _fmt(key, v, unit):
    if key == "kernels":
        return f"{v}"
    if key == "flops":
        return f"{v / 1e12:.3f} T"
    if key == "roofline_s":
        return f"{v * 1e3:.3f} ms"
    return f"{v / 1e9:.3f} GB ({v / unit:.1f} u)"


def table(pairs) -> str:
    lines = []
    for ours, off in pairs:
        a, b, r = ours.summary(), off.summary(), compare(ours, off)
        lines.append(f"\n{a['label']} vs {b['label']}   (u = one N x C bf16 activation, {a['unit_bytes'] / 1e6:.2f} MB)")
        lines.append(f"{'':<30}{'ours':>24}{'official':>24}{'ratio':>8}")
        for key, name in ROWS:
            ratio = f"{r[key]:.3f}" if key in r else "-"
            lines.append(f"{name:<30}{_fmt(key, a[key], a['unit_bytes']):>24}{_fmt(key, b[key], b['unit_bytes']):>24}{ratio:>8}")
    return "\n".join(lines)


def cost_pairs(arch: str, img, batch: int = 1, stage: str = "block"):
    from ..models.config import get_arch

    if stage == "tokenizer":
        return [(tokenizer_costs(arch, img, batch), tokenizer_costs(arch, img, batch, official=True))]
    if stage == "pretrain":  # one whole pretraining step (teacher + student), ours vs the baseline recipe
        from .pretrain_cost import pretrain_costs

        ours, base = pretrain_costs(arch, img, batch, parts=False)
        return [(ours.total, base.total)]
    pairs = [block_costs(arch, img, batch, gqa=False)]
    if get_arch(arch).gqa_layers():
        pairs.append(block_costs(arch, img, batch, gqa=True))
    return pairs


def add_cost_parser(subparsers) -> None:
    p = subparsers.add_parser("cost", help="memory traffic / kernels / saved bytes, ours vs the official block")
    p.add_argument("--arch", default=None, help="default sapiens2_0.4b (sapiens2_1b for --stage pretrain)")
    p.add_argument("--img", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="default 1024 768 (4096 3072 for --stage tokenizer; global views for --stage pretrain)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--stage", choices=("block", "tokenizer", "pretrain"), default="block",
                   help="pretrain: one pretraining step per image, ours vs the official backbone + plain PyTorch")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="tokenizer stage: also cost this MAE ratio; pretrain stage: the global views' (default 0.75)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_cost)


def run_cost(args) -> int:
    if args.stage == "pretrain":
        from .pretrain_cost import run_pretrain_cost

        return run_pretrain_cost(args)
    args.arch = args.arch or "sapiens2_0.4b"
    img = tuple(args.img) if args.img else ((4096, 3072) if args.stage == "tokenizer" else (1024, 768))
    pairs = cost_pairs(args.arch, img, args.batch, args.stage)
    masked = None
    if args.stage == "tokenizer" and args.mask_ratio:
        masked = tokenizer_costs(args.arch, img, args.batch, mask_ratio=args.mask_ratio)
    if args.json:
        out = [{"ours": o.summary(), "official": f.summary(), "ratio": compare(o, f)} for o, f in pairs]
        if masked:
            out.append({"ours_masked": masked.summary()})
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.arch} at {img[0]}x{img[1]}, batch {args.batch}, training step (forward + backward), bf16")
    print(table(pairs))
    if args.stage == "tokenizer":
        sh = forward_stage_share(args.arch, img, args.batch)
        print(f"\ninference forward on an H100 (roofline): whole model {sh['forward_roofline_s'] * 1e3:.2f} ms, "
              f"tokenizer {sh['tokenizer_roofline_s'] * 1e3:.2f} ms = {sh['tokenizer_share']:.1%} of it")
    if masked:
        m, u = masked.summary(), pairs[0][0].summary()
        print(f"\nat {args.mask_ratio:.0%} masking: FLOPs {m['flops'] / u['flops']:.3f} and bytes "
              f"{m['bytes'] / u['bytes']:.3f} of the unmasked figures ({m['bytes'] / 1e9:.1f} GB, "
              f"{m['roofline_s'] * 1e3:.2f} ms)")
    return 0
