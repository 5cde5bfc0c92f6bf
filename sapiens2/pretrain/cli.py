"""``sapiens2 pretrain`` and ``python -m sapiens2.pretrain`` (what torchrun launches)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (a CPU try-out), 0.4b, 0.8b, 1b, 1b_4k, 5b")
    p.add_argument("--data", default=None, help="image folder, .txt list, .jsonl manifest, or 'synthetic'")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (run.steps)")
    p.add_argument("--global-batch", type=int, default=None, help="images per optimizer step, all ranks (run.global_batch)")
    p.add_argument("--out", default="runs/pretrain", help="run directory: metrics.jsonl, checkpoints/, exports")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=1e-4 --set run.precision=fp32")
    p.add_argument("--export", default="teacher", choices=["teacher", "student", "none"],
                   help="backbone written as .safetensors (official keys) at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan and predicted step time on --gpus GPUs; allocates nothing")
    p.add_argument("--gpus", type=int, nargs="+", default=[8], help="GPU counts for --dry-run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def build_config(args):
    from ..train.config import apply_overrides
    from .config import get_preset

    cfg = get_preset(args.preset)
    if args.data is not None:
        cfg.data.source = args.data
    if args.steps is not None:
        cfg.run.steps = args.steps
    if args.global_batch is not None:
        cfg.run.global_batch = args.global_batch
    apply_overrides(cfg, args.set)
    return cfg


def run(args) -> int:
    cfg = build_config(args)
    if args.print_config:
        from ..train.config import to_json

        print(to_json(cfg))
        return 0
    if args.dry_run:
        from .dry_run import dry_run, format_plan

        plans = [dry_run(cfg, g) for g in args.gpus]
        print(format_plan(cfg, plans))
        return 0
    from .trainer import run_pretrain

    res = run_pretrain(cfg, args.out, resume=args.resume, export=None if args.export == "none" else args.export)
    if res.last_losses:
        print(json.dumps({"out": res.out, "steps": res.steps_done, "skipped_images": res.skipped_images,
                          "last": {k: res.last_losses[k] for k in ("loss", "loss_mae", "loss_cl")}}))
    return 0


def main(argv=None) -> int:
    import sys

    from ..extras import MissingExtra

    p = argparse.ArgumentParser(prog="python -m sapiens2.pretrain", description="Sapiens2 pretraining (MAE + [CLS] "
                                "self-distillation) on FSDP2; launch with torchrun for several GPUs or nodes.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
