"""The timed half of the prepared GPU check (``scripts/gpu_check.sh``, ``make gpu-check``).

Times our kernels against what users would otherwise run, at the Sapiens2 shapes, on the GPU it
finds, and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``:

* ceilings measured first: device-to-device copy (GB/s, bytes read + written) and an 8192^3 bf16
  matmul (TFLOP/s);
* attention at batch 8 x 16 heads x N = 3081 for D = 64, 80, 76 (MHA) and D = 64 with GQA ratio 2,
  forward and forward + backward: ours (Triton; also the deterministic backward and the fused
  QK-norm + RoPE form), SDPA's flash and cuDNN backends, FlexAttention (compiled), and flash-attn /
  xformers when importable. Each library gets its native layout: ours and flash-attn / xformers
  ``(B, N, H, D)``, SDPA and FlexAttention ``(B, H, N, D)``, all contiguous;
* the row ops at the real shapes (batch 8 x 3081 tokens): RMSNorm, add + RMSNorm, SwiGLU and
  QK-norm + RoPE on each backend against PyTorch eager, and the 1B-4K tokenizer's window attention
  (one 4096 x 3072 image's 256 x 192 patch grid, 4 x 4 windows + CLS, 24 heads x 64) against the
  official composition (window permute copy, CLS concat, SDPA).

FLOP/s use the model convention for every library alike (attention forward ``4 B H N^2 D``, the
backward 2.5x that), and GB/s the bytes the op must move at least (inputs read once, outputs
written once), so every ratio between two rows is a ratio of their times. Gradients are taken
with ``torch.autograd.grad`` (no ``.grad`` accumulation kernels in anyone's time). Times are the
median of ``triton.testing.do_bench``. A measurement that fails (an unsupported head dim, a
missing library) is recorded with its reason; ``--budget-s`` bounds the whole run (the rest is
recorded as skipped), and the files are rewritten after every row so a run cut short still
reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

B, H, N, P = 8, 16, 3081, 9
ATTN_SHAPES = [  # (label, H, Hkv, D)
    ("D=64", 16, 16, 64), ("D=80", 16, 16, 80), ("D=76", 16, 16, 76), ("D=64 GQA 2", 16, 8, 64)]
ROW_WIDTHS = [1024, 2432]  # 0.4B and 5B widths


class Check:
    def __init__(self, out: str, budget_s: float, quick: bool = False):
        self.out, self.deadline, self.quick = out, time.time() + budget_s, quick
        self.rows: list[dict] = []
        self.ceilings: dict = {}
        self.env = _environment()
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def bench(self, fn: Callable[[], object]) -> float:
        from triton.testing import do_bench

        warm, rep = (5, 20) if self.quick else (25, 100)
        return float(do_bench(fn, warmup=warm, rep=rep, return_mode="median"))

    def bench_graph(self, fn: Callable[[], object]) -> float:
        """GPU time alone: ``fn`` captured in a CUDA graph and replayed (no Python or launch overhead)."""
        from triton.testing import do_bench_cudagraph

        fn()  # warm (compile, allocate) outside the capture
        torch.cuda.synchronize()
        return float(do_bench_cudagraph(fn, rep=20 if self.quick else 100, return_mode="median"))

    def row(self, group: str, shape: str, impl: str, phase: str, fn: Optional[Callable], flops: float = 0.0,
            nbytes: float = 0.0, min_left: float = 5.0, note: str = "", graph: bool = False) -> None:
        """One measurement: eager time (what a user calling the op sees, Python and launches included) and,
        with ``graph``, the GPU time of a CUDA-graph replay; FLOP/s and GB/s from the GPU time when measured."""
        r = {"group": group, "shape": shape, "impl": impl, "phase": phase, "ms": None, "graph_ms": None, "note": note}
        if fn is None:
            r["skipped"] = note or "not available"
        elif self.left() < min_left:
            r["skipped"] = "time budget spent"
        else:
            try:
                r["ms"] = self.bench(fn)
                if graph:
                    try:
                        r["graph_ms"] = self.bench_graph(fn)
                    except Exception as e:  # capture refused: keep the eager time
                        r["graph_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        torch.cuda.synchronize()
                ms = r["graph_ms"] or r["ms"]
                r.update(tflops=flops / ms / 1e9 if flops else None, gbps=nbytes / ms / 1e6 if nbytes else None)
                if r["tflops"] and self.ceilings.get("matmul_tflops"):
                    r["pct_matmul"] = 100 * r["tflops"] / self.ceilings["matmul_tflops"]
                if r["gbps"] and self.ceilings.get("copy_gbps"):
                    r["pct_copy"] = 100 * r["gbps"] / self.ceilings["copy_gbps"]
            except Exception as e:  # an unsupported configuration: record why, go on
                r["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if os.environ.get("SAPIENS2_GPU_CHECK_DEBUG"):
                    traceback.print_exc()
            torch.cuda.synchronize()
        self.rows.append(r)
        shown = f"{r['ms']:.3f} ms" if r["ms"] is not None else f"skipped ({r['skipped']})"
        if r.get("graph_ms"):
            shown += f" (graph {r['graph_ms']:.3f} ms)"
        print(f"  {group:<14} {shape:<22} {impl:<28} {phase:<8} {shown}", flush=True)
        self.write()

    def write(self) -> None:
        _add_ratios(self.rows)
        doc = {"environment": self.env, "ceilings": self.ceilings, "rows": self.rows}
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(markdown(doc))


def _environment() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    from ..ops.backend import cuda_extension_available

    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gb": round(p.total_memory / 1e9, 1),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cuda_extension": cuda_extension_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _add_ratios(rows: list[dict]) -> None:
    """Each row of ours gets ``speedup`` over every other implementation of the same (group, shape,
    phase): their time / ours, on GPU times (graph replays) when both rows have one, else eager."""
    for r in rows:
        if not r["impl"].startswith("ours") or r["ms"] is None:
            continue
        sp = {}
        for o in rows:
            if o is r or o["ms"] is None or o["impl"].startswith("ours") or \
                    (o["group"], o["shape"], o["phase"]) != (r["group"], r["shape"], r["phase"]):
                continue
            both = r.get("graph_ms") and o.get("graph_ms")
            sp[o["impl"]] = (o["graph_ms"] / r["graph_ms"]) if both else (o["ms"] / r["ms"])
        r["speedup"] = sp


def markdown(doc: dict) -> str:
    env, ceil = doc["environment"], doc["ceilings"]
    lines = [f"# GPU check: {env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, extension built: {env['cuda_extension']}", ""]
    if ceil:
        lines += [f"Measured ceilings: copy {ceil.get('copy_gbps', 0):.0f} GB/s (read + write), bf16 matmul "
                  f"{ceil.get('matmul_tflops', 0):.0f} TFLOP/s (8192^3).", ""]
    lines += ["Eager ms: calling the op from Python (launch overhead included); graph ms: the GPU time of a CUDA-graph "
              "replay (row ops). Rates and speedups use the graph time where both sides have one.", "",
              "| group | shape | impl | phase | eager ms | graph ms | TFLOP/s | GB/s | % matmul | % copy | "
              "ours vs baselines (x faster) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else ""  # noqa: E731
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else f"skipped: {r.get('skipped', '')}"
        sp = ", ".join(f"{k} {v:.2f}" for k, v in r.get("speedup", {}).items())
        lines.append(f"| {r['group']} | {r['shape']} | {r['impl']} | {r['phase']} | {ms} | {f('graph_ms', '%.3f')} | "
                     f"{f('tflops', '%.0f')} | {f('gbps', '%.0f')} | {f('pct_matmul', '%.0f')} | {f('pct_copy', '%.0f')} | "
                     f"{sp} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(chk: Check) -> None:
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = chk.bench(lambda: y.copy_(x))
    chk.ceilings["copy_gbps"] = 2 * x.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = chk.bench(lambda: a @ b)
    chk.ceilings["matmul_tflops"] = 2 * 8192**3 / ms / 1e9
    print(f"ceilings: copy {chk.ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {chk.ceilings['matmul_tflops']:.0f} TFLOP/s",
          flush=True)


# ---------------------------------------------------------------------------------------------- attention


def _grad_fn(fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """Forward + backward to ``inputs`` from a fixed random output gradient (made on the first call,
    a warm-up call, so that a failure surfaces inside the measurement)."""
    state: dict = {}

    def run():
        out = fwd()
        if "g" not in state:
            state["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, state["g"])
    return run


def _try_import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as e:
        return e


def attention_rows(chk: Check) -> None:
    import sapiens2.ops as ops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fa = _try_import("flash_attn")
    xf = _try_import("xformers.ops")
    flex_compiled = None
    for label, Hq, Hkv, D in ATTN_SHAPES:
        shape = f"B{B} H{Hq}/{Hkv} N{N} {label}"
        fl_f = 4.0 * B * Hq * N * N * D
        fl_fb = fl_f * 3.5
        by_f = 2.0 * B * N * D * (2 * Hq + 2 * Hkv)  # q, k, v read, o written
        by_fb = by_f + 2.0 * B * N * D * (2 * Hq + 2 * Hkv) + 2.0 * B * N * D * Hq  # + do, dq, dk, dv, (o re-read)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
        q, k, v = mk(B, N, Hq, D), mk(B, N, Hkv, D), mk(B, N, Hkv, D)
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        wq, wk = (torch.ones(D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        ang = torch.rand(N - P, D, device="cuda") * 6.28
        sin, cos = ang.sin().to(torch.bfloat16), ang.cos().to(torch.bfloat16)
        gqa = Hq != Hkv

        def ours(det=False):
            def f():
                with ops.use_backend("triton", strict=True):
                    return ops.attention(q, k, v, deterministic=det)
            return f

        def ours_fused():
            with ops.use_backend("triton", strict=True):
                return ops.attention(q, k, v, q_norm_weight=wq, k_norm_weight=wk, rope=(sin, cos), num_prefix_tokens=P)

        def sdpa(backend):
            def f():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
            return f

        def official_fused():  # the official q/k norm + RoPE + SDPA (flash) in eager PyTorch
            qn = F.rms_norm(qt, (D,), wq, 1e-6)
            kn = F.rms_norm(kt, (D,), wk, 1e-6)

            def rope(x):
                x1, x2 = x[..., P:, :].chunk(2, -1)
                rot = torch.cat([-x2, x1], -1)
                return torch.cat([x[..., :P, :], x[..., P:, :] * cos + rot * sin], dim=-2)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(rope(qn), rope(kn), vt, enable_gqa=gqa)

        impls = [("ours (triton)", ours(), [q, k, v]), ("ours, deterministic bwd", ours(True), [q, k, v]),
                 ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION), [qt, kt, vt]),
                 ("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION), [qt, kt, vt]),
                 ("sdpa efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION), [qt, kt, vt])]
        if chk.left() > 90:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                flex_compiled = flex_compiled or torch.compile(flex_attention, dynamic=False)
                impls.append(("flex (compiled)", lambda: flex_compiled(qt, kt, vt, enable_gqa=gqa), [qt, kt, vt]))
            except Exception as e:
                impls.append(("flex (compiled)", None, f"{type(e).__name__}: {e}"))
        else:
            impls.append(("flex (compiled)", None, "time budget: compile skipped"))
        if isinstance(fa, Exception):
            impls.append(("flash-attn", None, f"not importable ({type(fa).__name__})"))
        else:
            impls.append(("flash-attn", lambda: fa.flash_attn_func(q, k, v), [q, k, v]))
        if isinstance(xf, Exception):
            impls.append(("xformers", None, f"not importable ({type(xf).__name__})"))
        elif not gqa:
            impls.append(("xformers", lambda: xf.memory_efficient_attention(q, k, v), [q, k, v]))
        for name, fwd, ins in impls:
            if fwd is None:
                chk.row("attention", shape, name, "fwd", None, note=ins)
                continue
            if "deterministic" not in name:  # its forward is ours
                chk.row("attention", shape, name, "fwd", fwd, fl_f, by_f)
            chk.row("attention", shape, name, "fwd+bwd", _grad_fn(fwd, ins), fl_fb, by_fb)
        if label == "D=64 GQA 2" or D == 76:
            pro = [q, k, v, wq, wk]
            chk.row("attention+qknorm+rope", shape, "ours (fused prologue)", "fwd", ours_fused, fl_f, by_f)
            chk.row("attention+qknorm+rope", shape, "ours (fused prologue)", "fwd+bwd", _grad_fn(ours_fused, pro),
                    fl_fb, by_fb)
            opro = [qt, kt, vt, wq, wk]
            chk.row("attention+qknorm+rope", shape, "official (eager norm/rope + sdpa flash)", "fwd", official_fused,
                    fl_f, by_f)
            chk.row("attention+qknorm+rope", shape, "official (eager norm/rope + sdpa flash)", "fwd+bwd",
                    _grad_fn(official_fused, opro), fl_fb, by_fb)


# ---------------------------------------------------------------------------------------------- row ops


def row_op_rows(chk: Check) -> None:
    import sapiens2.ops as ops
    from ..ops.backend import cuda_extension_available

    backends = ["triton"] + (["cuda"] if cuda_extension_available() else [])
    T = B * N
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    for C in ROW_WIDTHS:
        x, r, w, s = mk(T, C), mk(T, C), mk(C), mk(C)
        x12 = mk(T, 8 * C)
        e = 2.0 * T * C
        cases = [
            ("rms_norm", f"{T}x{C}", lambda: ops.rms_norm(x, w), lambda: F.rms_norm(x, (C,), w, 1e-6), [x, w],
             2 * e, 5 * e),
            ("add+rms_norm", f"{T}x{C}", lambda: ops.rms_norm(x, w, residual=r, x_scale=s)[0],
             lambda: F.rms_norm(r + s * x, (C,), w, 1e-6), [x, r, w, s], 4 * e, 8 * e),
            ("swiglu", f"{T}x{8 * C}", lambda: ops.swiglu(x12), lambda: F.silu(x12[:, :4 * C]) * x12[:, 4 * C:],
             [x12], 12 * e, 24 * e),
        ]
        for op, shape, ours_fn, torch_fn, ins, by_f, by_fb in cases:
            for be in backends:
                def f(fn=ours_fn, be=be):
                    with ops.use_backend(be, strict=True):
                        return fn()
                chk.row(op, shape, f"ours ({be})", "fwd", f, nbytes=by_f, graph=True)
                chk.row(op, shape, f"ours ({be})", "fwd+bwd", _grad_fn(f, ins), nbytes=by_fb, graph=True)
            chk.row(op, shape, "torch eager", "fwd", torch_fn, nbytes=by_f, graph=True)
            chk.row(op, shape, "torch eager", "fwd+bwd", _grad_fn(torch_fn, ins), nbytes=by_fb, graph=True)
    # QK-norm + RoPE at the 0.4B GQA layer's heads
    Hq, Hkv, D = 16, 8, 64
    q, k, wq, wk = mk(B, N, Hq, D), mk(B, N, Hkv, D), mk(D), mk(D)
    ang = torch.rand(N - P, D, device="cuda") * 6.28
    sin, cos = ang.sin(), ang.cos()

    def official():
        def one(x, w):
            x = F.rms_norm(x, (D,), w, 1e-6)
            x1, x2 = x[:, P:].chunk(2, -1)
            rot = torch.cat([-x2, x1], -1)
            return torch.cat([x[:, :P], (x[:, P:] * cos[:, None] + rot * sin[:, None]).to(x.dtype)], 1)
        return torch.cat([one(q, wq).flatten(), one(k, wk).flatten()])

    e = 2.0 * B * N * (Hq + Hkv) * D
    for be in backends:
        chk.row("qk_norm_rope", f"B{B} N{N} H{Hq}/{Hkv} D{D}", f"ours ({be})", "fwd",
                lambda be=be: _qk(ops, be, q, k, wq, wk, sin, cos), nbytes=2 * e, graph=True)
        chk.row("qk_norm_rope", f"B{B} N{N} H{Hq}/{Hkv} D{D}", f"ours ({be})", "fwd+bwd",
                _grad_fn(lambda be=be: _qk(ops, be, q, k, wq, wk, sin, cos), [q, k, wq, wk]), nbytes=5 * e, graph=True)
    chk.row("qk_norm_rope", f"B{B} N{N} H{Hq}/{Hkv} D{D}", "official (eager)", "fwd", official, nbytes=2 * e,
            graph=True)
    chk.row("qk_norm_rope", f"B{B} N{N} H{Hq}/{Hkv} D{D}", "official (eager)", "fwd+bwd",
            _grad_fn(official, [q, k, wq, wk]), nbytes=5 * e, graph=True)


def _qk(ops, be, q, k, wq, wk, sin, cos):
    with ops.use_backend(be, strict=True):
        a, b = ops.qk_norm_rope(q, k, wq, wk, sin, cos, P)
    return torch.cat([a.flatten(), b.flatten()])


def window_rows(chk: Check) -> None:
    """The 1B-4K tokenizer's window attention on one image: 256 x 192 patches, 4 x 4 windows + CLS."""
    import sapiens2.ops as ops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from ..ops.backend import cuda_extension_available

    gh, gw, w, Hh, D = 256, 192, 4, 24, 64
    nW, L = (gh // w) * (gw // w), gh * gw
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(1, L, Hh, D), mk(1, L, Hh, D), mk(1, L, Hh, D)
    pq, pk, pv = mk(1, nW, Hh, D), mk(1, nW, Hh, D), mk(1, nW, Hh, D)
    ins = [q, k, v, pq, pk, pv]
    shape = f"{gh}x{gw} grid, w{w}+CLS, H{Hh} D{D}"
    fl = 4.0 * Hh * D * nW * (w * w + 1) ** 2
    by = 2.0 * 2 * 3 * (L + nW) * Hh * D  # q, k, v, prefix read; o, prefix o written

    def official():
        def win(t):  # (1, L, H, D) grid -> (nW, H, w*w, D), the official permute copy
            return t.view(gh // w, w, gw // w, w, Hh, D).permute(0, 2, 4, 1, 3, 5).reshape(nW, Hh, w * w, D)
        qs, ks, vs = (torch.cat([p.view(nW, Hh, 1, D), win(t)], 2) for p, t in ((pq, q), (pk, k), (pv, v)))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(qs, ks, vs)

    for be in ["triton"] + (["cuda"] if cuda_extension_available() else []):
        def f(be=be):
            with ops.use_backend(be, strict=True):
                o, po = ops.window_attention(q, k, v, (gh, gw), w, pq, pk, pv)
            return torch.cat([o.flatten(), po.flatten()])
        chk.row("window_attention", shape, f"ours ({be})", "fwd", f, fl, by, graph=True)
        chk.row("window_attention", shape, f"ours ({be})", "fwd+bwd", _grad_fn(f, ins), 3.5 * fl, 2.5 * by,
                graph=True)
    chk.row("window_attention", shape, "official (permute + cat + sdpa)", "fwd", official, fl, by, graph=True)
    chk.row("window_attention", shape, "official (permute + cat + sdpa)", "fwd+bwd", _grad_fn(official, ins),
            3.5 * fl, 2.5 * by, graph=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop measuring after this many seconds")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions per measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to time")
        return 2
    chk = Check(args.out, args.budget_s, args.quick)
    print(f"gpu_check on {chk.env['gpu']}: torch {chk.env['torch']}, triton {chk.env['triton']}", flush=True)
    measure_ceilings(chk)
    for section in (attention_rows, row_op_rows, window_rows):
        if chk.left() <= 5:
            print(f"time budget spent before {section.__name__}", flush=True)
            break
        try:
            section(chk)
        except Exception:  # keep what was measured; say what broke
            traceback.print_exc()
    chk.write()
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
