"""Optional report sections, registered with ``sapiens2.bench.run``: the cost model (ours vs the
official block), the Hopper compile gate (Triton configs and the CUDA kernels of csrc/), and, on a
GPU, measured per-op throughput."""

from __future__ import annotations

from .report import Report
from .run import register_section


def _cost(rep: Report, quick: bool) -> None:
    from ..models.config import ARCH_ZOO
    from .cost import compare, tokenizer_costs
    from .cost_cli import cost_pairs

    archs = ["sapiens2_0.4b"] if quick else list(ARCH_ZOO)
    rows, per_op = [], []
    for arch in archs:
        for ours, off in cost_pairs(arch, (1024, 768)):
            r = compare(ours, off)
            for side in (ours, off):
                s = side.summary()
                rows.append({"arch": arch, **{k: s[k] for k in ("label", "bytes_units", "bytes_outside_matmul_units",
                                                                "kernels", "saved_bytes_units", "flops", "roofline_s")},
                             "bytes_ratio": r["bytes"] if side is ours else 1.0,
                             "kernels_ratio": r["kernels"] if side is ours else 1.0,
                             "saved_ratio": r["saved_bytes"] if side is ours else 1.0})
            if arch == archs[0]:
                per_op += [{"side": ours.label, **o} for o in ours.per_op()] + [{"side": off.label, **o} for o in off.per_op()]
    tok = [tokenizer_costs("sapiens2_1b", (4096, 3072)), tokenizer_costs("sapiens2_1b", (4096, 3072), official=True),
           tokenizer_costs("sapiens2_1b", (4096, 3072), mask_ratio=0.75)]
    tok_rows = [{k: t.summary()[k] for k in ("label", "bytes", "kernels", "flops", "saved_bytes", "roofline_s")} for t in tok]
    rep.section("cost_blocks", "Cost model: one block, training step, ours vs the official code on a GPU", rows,
                "Units (u): one N x C bf16 activation. Official costed as PyTorch runs it on a GPU (fused RMSNorm, "
                "flash SDPA), pure bf16. Roofline: H100 SXM, max(FLOPs / 989.4 TFLOP/s, bytes / 3.35 TB/s) per op.")
    rep.section("cost_per_op", f"Per-op breakdown ({archs[0]}, full-attention block)", per_op)
    rep.section("cost_tokenizer", "The 1B-4K tokenizer stage (4096x3072, per image)", tok_rows,
                "Ours recomputes the stage in backward like the official code; the 75% masked row computes only "
                "the visible windows.")
    _plot_cost(rows, rep.plot("cost_blocks", "Bytes moved and kept per block, ours vs official"))


def _plot_cost(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['arch'].replace('sapiens2_', '')}\n{r['label']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["bytes_units"] for r in rows], 0.4, label="bytes moved (u)")
    ax.bar([x + 0.2 for x in xs], [r["saved_bytes_units"] for r in rows], 0.4, label="kept for backward (u)")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("N x C bf16 activations")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_ylim(0, max(r["bytes_units"] for r in rows) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compile(rep: Report, quick: bool) -> None:
    from ..kernels.compile_gate import cached_gate

    rows = cached_gate("sm_90a")
    clean = sum(r["compiled"] and not r["spill_bytes"] and r["shared_bytes"] <= 227 * 1024 for r in rows)
    rep.section("compile_sm90a", "Hopper (sm_90a) compile report of every shipped Triton config", rows,
                f"{clean} of {len(rows)} configs compile with no register spills and at most 227 KiB shared memory "
                "(AOT, no GPU; cached per kernel-source hash).",
                columns=["kernel", "compiled", "registers", "spill_bytes", "shared_bytes", "wgmma", "tma"])
    _compile_cuda(rep)


def _compile_cuda(rep: Report) -> None:
    """The hand-written CUDA kernels of csrc/kernels through nvcc (cached per file content)."""
    from ..cuda_tools import gate

    try:
        rows = gate.run_gate(("sm_90a",))
    except gate.GateUnavailable as e:
        rep.note(f"_CUDA kernels (csrc/kernels): not compiled here: {e}._")
        return
    clean = sum(gate.clean(r) for r in rows)
    rep.section("compile_cuda_sm90a", "Hopper (sm_90a) compile report of the hand-written CUDA kernels", rows,
                f"{clean} of {len(rows)} kernels from {len({r['file'] for r in rows})} files compile with no register "
                "spills, no local stack and at most 227 KiB static shared memory (nvcc "
                "`-O3 --use_fast_math`, ptxas -v; no GPU; cached per source hash).",
                columns=["kernel", "file", "compiled", "registers", "spill_bytes", "stack_bytes", "shared_bytes",
                         "barriers"],
                fmt={"kernel": lambda v: f"`{v}`"})  # template brackets are not HTML


def _gpu_ops(rep: Report, quick: bool) -> None:
    import torch

    if not torch.cuda.is_available():
        rep.note("_No GPU on this machine: per-op timings are skipped (the interpreter is never timed). Run "
                 "`sapiens2 bench` on an H100 for achieved bandwidth, TFLOP/s and % of roofline._")
        return
    import sapiens2.ops as ops

    from .device import H100_SXM, current_device_peak, roofline_seconds
    from .timing import time_fn

    peak = current_device_peak() or H100_SXM
    N, C, H, D = 3081, 1024, 16, 64
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(8, N, C, **bf), torch.randn(C, **bf)
    q, k = torch.randn(8, N, H, D, **bf), torch.randn(8, N, H // 2, D, **bf)
    cases = [
        ("rms_norm", lambda: ops.rms_norm(x, w), 0, 2 * x.numel() * 2),
        ("add_rms_norm", lambda: ops.rms_norm(x, w, residual=x, x_scale=w), 0, 4 * x.numel() * 2),
        ("swiglu", lambda: ops.swiglu(torch.cat([x, x], -1)), 0, 3 * x.numel() * 2),
        ("attention D=64", lambda: ops.attention(q, k, k), 4 * 8 * H * N * N * D, (2 * q.numel() + 2 * k.numel()) * 2),
    ]
    rows = []
    for name, fn, flops, nbytes in cases:
        for backend in ("reference", "triton"):
            with ops.use_backend(backend):
                t = time_fn(fn)
            rows.append({"op": name, "backend": backend, "median_ms": t.median_s * 1e3,
                         "GB_per_s": nbytes / t.median_s / 1e9, "TFLOP_per_s": flops / t.median_s / 1e12,
                         "pct_of_roofline": 100 * roofline_seconds(flops, nbytes, peak) / t.median_s, "device": t.device})
    rep.section("gpu_ops", "Measured per-op throughput (batch 8, N = 3081, 0.4B shapes)", rows)


register_section("cost", _cost)
register_section("compile", _compile)
register_section("gpu", _gpu_ops)
