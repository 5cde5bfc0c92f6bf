"""``sapiens2 bench``: the main job. On any machine it writes a report folder (JSON, Markdown, PNG).

On a CPU it gives every figure that needs no GPU: FLOPs and parameters beside the model card,
scaling with resolution and size, the memory-traffic cost model (ours vs the official block as
PyTorch runs it on a GPU) with predicted H100 roofline times, and the Hopper compile report. On a
GPU it adds measured per-op and whole-model throughput (bandwidth, TFLOP/s, % of roofline, MFU).
Interpreter runs are never timed.
"""

from __future__ import annotations

import os
import time

from ..extras import require
from .report import Report


def _section_flops(rep: Report, quick: bool) -> None:
    from ..flops import zoo_table

    rows = zoo_table()
    rep.section(
        "flops", "Parameters and FLOPs beside the published model card", rows,
        "MACs: Linear + patch conv, one forward, batch 1 (the model card's convention). The published FLOPs "
        "column is not reproducible from the released code (residuals shown); no factor is applied.",
        columns=["model", "img_size", "params", "params_published_B", "params_residual_pct", "macs_linear_conv",
                 "flops_published_T", "macs_residual_pct", "flops_attention", "flops_forward", "flops_train_step"],
    )


def _section_scaling(rep: Report, quick: bool) -> None:
    from .scaling import plot_scaling, scaling_rows

    rows = scaling_rows()
    rep.section("scaling", "Scaling with resolution and model size", rows,
                "Training-step FLOPs for one image; the H100 time is at 100% of the bf16 peak (a lower bound).",
                columns=["arch", "resolution", "use_tokenizer", "params", "trunk_tokens", "flops_train_step",
                         "attention_share", "h100_train_step_s_at_peak"])
    plot_scaling(rows, rep.plot("scaling", "Training-step FLOPs vs resolution and model size"))


def _section_attention(rep: Report, quick: bool) -> None:
    from .attention_roofline import attention_table

    rows = attention_table()
    rep.section(
        "attention_roofline", "Attention at N = 3081, batch 8, GQA 2: ours vs flash-attn 2 and FlexAttention", rows,
        "Counted from each library's launch plan (its kernels, tiles and copies): roofline-bound H100 SXM times "
        "(per kernel, max of FLOPs / 989.4 TFLOP/s and bytes / 3.35 TB/s). flash-attn pads 76 to 80 in memory "
        "(copies) and computes 80 and 76 in its 96-wide template; FlexAttention computes them at 128 in registers.",
        columns=["arch", "library", "D", "D_in_tiles", "fwd_flops", "fwd_bytes", "fwd_roofline_s", "bwd_flops",
                 "bwd_bytes", "bwd_kernels", "bwd_roofline_s"],
    )


SECTIONS = [("flops", _section_flops), ("scaling", _section_scaling), ("attention", _section_attention)]


def register_section(name: str, fn) -> None:
    """Later modules (cost model, compile report, GPU timings) add their sections here."""
    SECTIONS.append((name, fn))


def run(out_dir: str = "bench-report", quick: bool = False, only: list[str] | None = None) -> Report:
    from . import sections  # noqa: F401  (registers the optional sections)

    rep = Report(out_dir, "sapiens2 benchmark report" + (" (quick)" if quick else ""))
    t0 = time.time()
    chosen = [(n, f) for n, f in SECTIONS if not only or n in only]
    tqdm = require("tqdm", "bench", "sapiens2 bench").tqdm
    require("matplotlib", "bench", "sapiens2 bench")  # the report's plots
    for name, fn in tqdm(chosen, desc="sapiens2 bench", unit="section", disable=None):
        fn(rep, quick)
    rep.note(f"_Generated in {time.time() - t0:.1f} s on {_machine()}._")
    rep.write()
    return rep


def _machine() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node() or 'host'} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu})"
