"""The ``sapiens2`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _fmt_t(x: float) -> str:
    return f"{x / 1e12:.4f}"


def cmd_flops(args) -> int:
    from .flops import count_flops, zoo_table

    if args.all:
        rows = zoo_table(schedule="official")
        ours = {(r["arch"], r["use_tokenizer"]): count_flops(r["arch"], tuple(r["img_size"]),
                use_tokenizer=r["use_tokenizer"]) for r in rows}
        if args.json:
            for r in rows:
                r["flops_train_step_ours"] = ours[(r["arch"], r["use_tokenizer"])].flops_train_step
            print(json.dumps(rows, indent=1))
            return 0
        head = (f"{'model':<17}{'img':>10}{'params':>14}{'pub.B':>7}{'resid%':>8}{'MACs T':>9}{'pub.T':>8}"
                f"{'resid%':>8}{'attn TF':>9}{'fwd TF':>9}{'train TF':>10}{'ours trn':>10}")
        print(head)
        print("-" * len(head))
        for r in rows:
            o = ours[(r["arch"], r["use_tokenizer"])]
            pub = "—" if r["flops_published_T"] is None else f"{r['flops_published_T']:.3f}"
            res = "—" if r["macs_residual_pct"] is None else f"{r['macs_residual_pct']:+.2f}"
            print(f"{r['model']:<17}{'x'.join(map(str, r['img_size'])):>10}{r['params']:>14,}{r['params_published_B']:>7}"
                  f"{r['params_residual_pct']:>+8.3f}{r['macs_linear_conv'] / 1e12:>9.4f}{pub:>8}{res:>8}"
                  f"{_fmt_t(r['flops_attention']):>9}{_fmt_t(r['flops_forward']):>9}{_fmt_t(r['flops_train_step']):>10}"
                  f"{_fmt_t(o.flops_train_step):>10}")
        print(
            "\nParams: exact count of the released code. MACs: Linear + patch-conv multiply-adds of one forward at batch 1\n"
            "(the model card's convention), in 1e12. The published FLOPs column cannot be reproduced from the released\n"
            "code: this rule is 0.75-5% off it (see 'resid%'), and 4 of the 6 published parameter counts differ from the\n"
            "code by up to 0.64%. No fudge factor is applied. attn/fwd/train: true FLOPs (2 per MAC) of the attention\n"
            "matmuls, the forward, and a training step (forward + backward, op by op) of the official computation;\n"
            "'ours trn': a training step as this library computes it (the 4K tokenizer's last layer keeps only the CLS row)."
        )
        return 0
    rep = count_flops(args.arch, tuple(args.img), batch=args.batch, use_tokenizer=args.tokenizer,
                      mask_ratio=args.mask_ratio, schedule=args.schedule)
    if args.json:
        print(json.dumps([rep.to_dict()], indent=1))
        return 0
    for k, v in rep.to_dict().items():
        print(f"{k:>26}: {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:>26}: {v}")
    return 0


def _cuda_extension_info() -> str:
    """Where the compiled extension sapiens2._C is, or why it is missing and how to build it."""
    import importlib.util

    from .ops.backend import cuda_extension_available

    spec = importlib.util.find_spec("sapiens2._C")
    if spec is None:
        return ("not built (pip install --no-build-isolation -e . with nvcc and a CUDA torch builds it for "
                "sm_80 + sm_90a; `pip install -v` shows why a build skipped it)")
    if not cuda_extension_available():
        try:
            importlib.import_module("sapiens2._C")
        except Exception as e:  # built but broken (e.g. built against another torch): say why
            return f"{spec.origin}: does not load: {type(e).__name__}: {e}"
    return f"{spec.origin} (sm_80 + sm_90a, compute_90 PTX)"


def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .ops import available_backends

    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    backends = available_backends()
    info = {
        "sapiens2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda,
        "triton": triton_v,
        "gpu": gpu,
        "cuda extension": _cuda_extension_info(),
        "backends": backends,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<10} {vv}")
        else:
            print(f"{k:<15} {v}")
    return 0


def cmd_kernels_report(args) -> int:
    """The Triton configs (``sapiens2.kernels.compile_gate``) and the hand-written CUDA kernels of
    ``csrc/kernels`` (``sapiens2.cuda_tools.gate``, nvcc), compiled for ``--target`` without a GPU."""
    rows, ok = [], True
    if args.language in ("all", "triton"):
        from .kernels.compile_gate import MAX_SHARED, print_report, run_gate

        triton_rows = run_gate(target=args.target, only_real_shapes=not args.all)
        ok &= all(r["compiled"] and not r["spill_bytes"] and (r["shared_bytes"] or 0) <= MAX_SHARED
                  for r in triton_rows)
        rows += triton_rows
        if not args.json:
            print(f"Triton kernels ({args.target}):")
            print_report(triton_rows)
    if args.language in ("all", "cuda"):
        from .cuda_tools import gate

        try:
            cuda_rows = gate.run_gate(targets=(args.target,))
        except gate.GateUnavailable as e:
            cuda_rows = []
            print(f"CUDA kernels (csrc/kernels): not compiled: {e}", file=sys.stderr if args.json else sys.stdout)
        else:
            ok &= all(gate.clean(r) for r in cuda_rows)
            if not args.json:
                nvcc = gate.find_nvcc()
                if rows:
                    print()
                print(f"CUDA kernels (csrc/kernels, {args.target}, {gate.nvcc_version(nvcc) if nvcc else 'nvcc'}):")
                gate.print_report(cuda_rows)
        rows += cuda_rows
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from .bench.run import run

    rep = run(args.out, quick=args.quick, only=args.only)
    print(f"wrote {len(rep.files)} files to {args.out}/ (report.md)")
    return 0


def cmd_bench_model(args) -> int:
    from .bench.model_bench import bench_model
    from .bench.sizing import activation_bytes_per_view, size_run

    out = {}
    measured_mfu = None
    if not args.dry_run:
        r = bench_model(args.arch, tuple(args.img), args.batch, args.train, args.tokenizer, repeats=args.repeats)
        out["measured"] = r.to_dict()
        measured_mfu = r.mfu if args.train else None
    if args.gpus:
        mfu_ = args.mfu or measured_mfu or 0.4
        act = activation_bytes_per_view(args.arch, tuple(args.img), args.tokenizer, args.mask_ratio)
        out["sizing"] = [
            size_run(args.arch, tuple(args.img), args.tokenizer, args.mask_ratio, args.gpus, args.global_batch,
                     args.micro_batch, args.views, args.steps, ck, mfu_, activation=act).to_dict()
            for ck in (False, True)
        ]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for k, v in out.get("measured", {}).items():
        print(f"{k:>18}: {v}")
    if "measured" in out and out["measured"]["mfu"] is None:
        print("(MFU needs a known GPU; this run measured on " + out["measured"]["device"] + ")")
    for sz in out.get("sizing", []):
        print(f"\nFSDP2 on {sz['gpus']} GPUs, checkpointing={sz['checkpointing']}, assumed MFU {sz['assumed_mfu']:.2f}:")
        print(f"  step {sz['step_seconds']:.3f} s, run {sz['run_hours']:.2f} h, grad accumulation {sz['grad_accum']}")
        print(f"  memory/GPU {sz['mem_total_gb']:.2f} GiB = state {sz['mem_state_gb']:.2f} + gathered params "
              f"{sz['mem_gathered_gb']:.2f} + activations {sz['mem_activations_gb']:.2f}")
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sapiens2", description="Sapiens2: fast kernels, model, cost accounting.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("flops", help="parameters, MACs and FLOPs of a variant (or --all beside the model card)")
    f.add_argument("--all", action="store_true", help="every released variant beside the published model card")
    f.add_argument("--arch", default="sapiens2_1b")
    f.add_argument("--img", type=int, nargs=2, default=[1024, 768], metavar=("H", "W"))
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--tokenizer", action="store_true", help="the 4K form with the window tokenizer")
    f.add_argument("--mask-ratio", type=float, default=0.0, help="MAE masking ratio (encoder sees the rest)")
    f.add_argument("--schedule", choices=("ours", "official"), default="ours")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_flops)

    pt = sub.add_parser("pretrain", help="pretrain a backbone (MAE + [CLS] self-distillation, FSDP2); "
                        "--preset tiny --data synthetic runs on a CPU in about a minute")
    from .pretrain.cli import add_arguments

    add_arguments(pt)
    pt.set_defaults(func=cmd_pretrain)

    i = sub.add_parser("info", help="versions, GPU, and which op backends are available")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("kernels", help="kernel tools")
    ksub = k.add_subparsers(dest="kernels_command", required=True)
    kr = ksub.add_parser("report", help="AOT-compile every shipped Triton config and CUDA kernel (no GPU needed)")
    kr.add_argument("--target", default="sm_90a", help="sm_90a (default) or sm_80")
    kr.add_argument("--all", action="store_true", help="every config, not only those the real shapes use")
    kr.add_argument("--language", choices=("all", "triton", "cuda"), default="all",
                    help="the Triton configs, the CUDA kernels of csrc/kernels (nvcc), or both (default)")
    kr.add_argument("--json", action="store_true", help="one list of rows; CUDA rows have language 'cuda'")
    kr.set_defaults(func=cmd_kernels_report)

    b = sub.add_parser("bench", help="the benchmark report (default), or one of its parts")
    b.add_argument("--quick", action="store_true", help="the fast form (about a minute on a 2-core CPU)")
    b.add_argument("--out", default="bench-report", help="report folder (JSON, Markdown, PNG)")
    b.add_argument("--only", nargs="*", help="only these sections")
    b.set_defaults(func=cmd_bench)
    bsub = b.add_subparsers(dest="bench_command")
    bm = bsub.add_parser("model", help="whole-model params, FLOPs, images/s, TFLOP/s, MFU, peak memory")
    bm.add_argument("--arch", default="sapiens2_0.4b")
    bm.add_argument("--img", type=int, nargs=2, default=[1024, 768], metavar=("H", "W"))
    bm.add_argument("--batch", type=int, default=1)
    bm.add_argument("--train", action="store_true", help="forward + backward (default: forward only)")
    bm.add_argument("--tokenizer", action="store_true")
    bm.add_argument("--repeats", type=int, default=10)
    bm.add_argument("--json", action="store_true")
    g = bm.add_argument_group("training-run sizing (FSDP2, with and without activation checkpointing)")
    g.add_argument("--gpus", type=int, help="size a training run on this many GPUs")
    g.add_argument("--global-batch", type=int, default=256)
    g.add_argument("--micro-batch", type=int, default=4, help="per-GPU micro-batch")
    g.add_argument("--views", type=int, default=1, help="views per image")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--mask-ratio", type=float, default=0.0)
    g.add_argument("--mfu", type=float, default=None, help="assumed MFU (default: measured on a GPU, else 0.4)")
    g.add_argument("--dry-run", action="store_true", help="size only; do not run the model")
    bm.set_defaults(func=cmd_bench_model)
    from .bench.attention_cli import add_attention_parser
    from .bench.cost_cli import add_cost_parser

    add_cost_parser(bsub)
    add_attention_parser(bsub)
    return p


def main(argv=None) -> int:
    from .extras import MissingExtra

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, MissingExtra) as e:
        print(f"sapiens2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
