"""Ahead-of-time compile of every shipped Triton config for Hopper (sm_90a) or Ampere (sm_80),
without a GPU: compiled or the error, registers per thread and spill bytes (``ptxas -v``), shared
memory, and whether the code uses wgmma / TMA. Must run in a process without TRITON_INTERPRET.

    python -m sapiens2.kernels.compile_gate [--target sm_90a] [--all] [--module NAME ...] [--json]

``sm_90a``: Triton's CUDA backend compiles capability 90 as ``sm_90a`` (the arch-specific
features wgmma / setmaxnreg / TMA multicast need), so the target is ``GPUTarget("cuda", 90, 32)``
and ptxas is run with ``--gpu-name=sm_90a``. Registers and spill bytes come from ``ptxas -v`` on
the PTX (the compiled kernel's metadata only carries them after a load onto a device), shared
memory from the metadata, wgmma / TMA from the PTX text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from ..cuda_tools.gate import parse_ptxas

MAX_SHARED = 227 * 1024
_TARGETS = {"sm_90a": 90, "sm_90": 90, "sm_80": 80}


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    funcs = parse_ptxas(r.stdout + r.stderr)  # the parser the CUDA kernels' gate uses
    regs = sum(f["registers"] or 0 for f in funcs)
    spills = sum(f["spill_stores"] + f["spill_loads"] for f in funcs)
    return regs, spills


_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld\.global|st\.global|cp\.async\.c[ag]\.shared\.global)([.\w]*)\s+(.*)$",
                     re.MULTILINE)
_BITS = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4, "s32": 4,
         "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def access_widths(ptx: str) -> dict[int, int]:
    """Global-memory access instructions of a kernel's PTX by width in bytes: ``ld/st.global`` with
    their vector and element types, ``cp.async`` (to shared memory) by its size operand. The share of
    16-byte accesses shows whether rows are aligned enough to vectorise (a 76-wide bf16 head row is
    152 bytes: 8-byte aligned at best)."""
    out: dict[int, int] = {}
    for m in _ACCESS.finditer(ptx):
        op, mods, operands = m.groups()
        if op.startswith("cp.async"):
            width = int(operands.rstrip(";").split(",")[2].strip(), 0)
        else:
            parts = mods.strip(".").split(".")
            vec = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
            width = vec * next((_BITS[p] for p in reversed(parts) if p in _BITS), 0)
        out[width] = out.get(width, 0) + 1
    return dict(sorted(out.items()))


def compile_config(c: dict, target: str = "sm_90a") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": c["name"], "language": "triton", "module": c.get("module"), "dtype": c.get("dtype"),
           "config": {"num_warps": c["num_warps"], "num_stages": c["num_stages"],
                      **{k: v for k, v in c["constexprs"].items() if k != "INTERPRET"}},
           "target": target, "compiled": False, "error": None, "registers": None, "spill_bytes": None,
           "shared_bytes": None, "wgmma": False, "tma": False, "access_widths": {}}
    try:
        k = triton.compile(ASTSource(fn=c["fn"], signature=c["signature"], constexprs=c["constexprs"],
                                     attrs=c.get("attrs")),
                           target=GPUTarget("cuda", _TARGETS[target], 32),
                           options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    except Exception as e:  # report, don't crash: the gate lists every failure
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        return row
    ptx = k.asm["ptx"]
    row["registers"], row["spill_bytes"] = _ptxas_usage(ptx, "sm_90a" if target.startswith("sm_90") else target)
    row.update(compiled=True, shared_bytes=int(k.metadata.shared),
               wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx, access_widths=access_widths(ptx))
    return row


def _selected(real: bool, modules) -> list[dict]:
    from .registry import shipped_configs

    return [c for c in shipped_configs(real) if not modules or c["module"] in modules]


def _compile_index(args):
    i, target, real, modules = args
    return compile_config(_selected(real, modules)[i], target)


def run_gate(target: str = "sm_90a", only_real_shapes: bool = True, jobs: int | None = None,
             modules: tuple[str, ...] | None = None) -> list[dict]:
    """Compile every shipped config (``only_real_shapes``: the bf16 real-shape ones; ``modules``:
    only those kernel modules) in a process pool; one row per config (see ``compile_config``)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate needs a process without TRITON_INTERPRET=1")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {sorted(_TARGETS)}, got {target!r}")
    modules = tuple(modules) if modules else None
    n = len(_selected(only_real_shapes, modules))
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(_compile_index, [(i, target, only_real_shapes, modules) for i in range(n)], chunksize=4))


def source_hash() -> str:
    """Hash of the kernel sources and the triton version: the key of a cached report."""
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def cached_gate(target: str = "sm_90a", cache_dir: str | None = None) -> list[dict]:
    """``run_gate`` in a clean subprocess, cached per kernel-source hash (for ``sapiens2 bench``)."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sapiens2")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"compile_gate_{target}_{source_hash()}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "sapiens2.kernels.compile_gate", "--target", target, "--json"],
                       capture_output=True, text=True, env=env, check=False)
    rows = json.loads(r.stdout)
    with open(path, "w") as f:
        json.dump(rows, f)
    return rows


def _share16(r: dict) -> str:
    """Share of the global accesses that are 16 bytes wide."""
    w = r.get("access_widths") or {}
    n = sum(w.values())
    return f"{100 * w.get(16, 0) / n:.0f}%" if n else "-"


def print_report(rows: list[dict]) -> None:
    print(f"{'kernel':<58}{'target':>8}{'ok':>4}{'regs':>6}{'spill':>7}{'smem KiB':>10}{'wgmma':>7}{'tma':>5}"
          f"{'16B acc':>8}")
    for r in rows:
        smem = "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f}"
        print(f"{r['kernel'][:57]:<58}{r['target']:>8}{'yes' if r['compiled'] else 'NO':>4}{r['registers'] or '-':>6}"
              f"{'-' if r['spill_bytes'] is None else r['spill_bytes']:>7}{smem:>10}{'yes' if r['wgmma'] else '-':>7}"
              f"{'yes' if r['tma'] else '-':>5}{_share16(r):>8}")
        if r["error"]:
            print(f"    error: {r['error']}")
    bad = [r for r in rows if not r["compiled"] or r["spill_bytes"] or (r["shared_bytes"] or 0) > MAX_SHARED]
    print(f"\n{len(rows)} configs, {len(rows) - len(bad)} clean (compiled, no spills, shared <= 227 KiB), {len(bad)} not")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="sm_90a")
    p.add_argument("--all", action="store_true", help="every config (fp16 too), not only the real-shape bf16 ones")
    p.add_argument("--module", action="append", default=None,
                   help="only this kernel module (rms_norm, swiglu, qk_norm_rope, attention, window_attention); repeatable")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = run_gate(a.target, only_real_shapes=not a.all, modules=a.module)
    if a.json:
        print(json.dumps(rows))
    else:
        print_report(rows)
    return 0 if all(r["compiled"] and not r["spill_bytes"] and r["shared_bytes"] <= MAX_SHARED for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
