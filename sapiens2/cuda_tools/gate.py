"""Compile gate for the hand-written CUDA kernels of ``csrc/kernels`` (no GPU needed).

Every ``csrc/kernels/*.cu`` is compiled by nvcc (``-std=c++17 -O3 --use_fast_math -Xptxas -v``,
device code only: ``-cubin``) for each target (sm_90a and sm_80 by default), one nvcc process per
(file, target), in parallel. ``ptxas -v`` is parsed per kernel: registers, spill stores / loads,
stack frame, static shared memory, barriers; the PTX tells whether a kernel uses wgmma, TMA or
``mma.sync``. Rows have the keys of the Triton gate (``sapiens2.kernels.compile_gate``) with
``language: "cuda"`` plus the CUDA details::

    {"kernel": "rms_norm_fwd_kernel<bf16, 8, 1>", "language": "cuda", "module": "rms_norm",
     "dtype": "bf16", "config": {"template": ["bf16", "8", "1"]}, "target": "sm_90a",
     "compiled": True, "error": None, "registers": 40, "spill_bytes": 0, "shared_bytes": 128,
     "wgmma": False, "tma": False, "mma": False, "spill_stores": 0, "spill_loads": 0,
     "stack_bytes": 0, "barriers": 1, "file": "rms_norm.cu", "signature": "void s2::...", ...}

``shared_bytes`` is the static shared memory; dynamic shared memory is a launch parameter (the
emulator refuses launches above 227 KiB). Results are cached per (file, target) under
``sources.cache_dir()/cuda_gate``, keyed by a hash of that file, every header of
``csrc/kernels``, the flags and the nvcc version, so only changed files recompile.

    python -m sapiens2.cuda_tools.gate [--target sm_90a --target sm_80] [--json] [--no-cache]

``sapiens2 kernels report`` shows these rows beside the Triton ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .sources import cache_dir, csrc_dir, kernel_sources

MAX_SHARED = 227 * 1024
TARGETS = ("sm_90a", "sm_80")
KNOWN_TARGETS = ("sm_90a", "sm_90", "sm_80")
FLAGS = ("-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v")
_GATE_VERSION = "1"  # bump when the row format changes (invalidates the cache)
_DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "bf16": "bf16", "fp16": "fp16"}


class GateUnavailable(RuntimeError):
    """No nvcc or no kernel sources: the gate cannot run here (the message says which)."""


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


@functools.lru_cache(maxsize=None)
def _nvcc_version_text(nvcc: str) -> str:
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def nvcc_version(nvcc: str) -> str:
    """``nvcc 13.0.88`` (the release line of ``nvcc --version``)."""
    text = _nvcc_version_text(nvcc)
    m = re.search(r"release [\d.]+, V([\d.]+)", text)
    return f"nvcc {m.group(1)}" if m else text.splitlines()[-1]


def _demangler() -> str | None:
    nvcc = find_nvcc()
    cands = [shutil.which("cu++filt")]
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cu++filt"))
    cands.append(shutil.which("c++filt"))
    return next((c for c in cands if c and os.path.exists(c)), None)


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled (``cu++filt`` if present, else ``c++filt``; unchanged without either)."""
    tool = _demangler()
    if not names or tool is None:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = r.stdout.splitlines()
    if r.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


# ---- parsing ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[dict]:
    """Per-function resources from ``ptxas -v`` output: one dict per entry function (kernel), and
    one per non-inlined device function that has a stack frame or spills (``entry: False``)."""
    funcs: dict[str, dict] = {}
    order: list[str] = []
    entry = props = None

    def get(name):
        if name not in funcs:
            funcs[name] = {"mangled": name, "entry": False, "registers": None, "barriers": 0, "shared_bytes": 0,
                           "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, "warnings": []}
            order.append(name)
        return funcs[name]

    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry = props = m.group(1)
            get(entry)["entry"] = True
            continue
        m = _PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props is not None:
            f = get(props)
            f["stack_bytes"], f["spill_stores"], f["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and entry is not None:
            f = get(entry)
            f["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            f["barriers"] = int(b.group(1)) if b else 0
            f["shared_bytes"] = int(s.group(1)) if s else 0
            continue
        if "warning" in line.lower():
            named = [n for n in funcs if n in line]
            for n in named or ([entry] if entry else []):
                get(n)["warnings"].append(line.strip())
    return [f for n in order for f in [funcs[n]]
            if f["entry"] or f["stack_bytes"] or f["spill_stores"] or f["spill_loads"]]


def ptx_features(ptx: str) -> dict[str, dict[str, bool]]:
    """Per entry function of a PTX file: whether it uses wgmma, TMA (cp.async.bulk.tensor), mma.sync."""
    out = {}
    parts = re.split(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+", ptx, flags=re.M)
    for part in parts[1:]:
        name = re.match(r"([\w$.]+)", part).group(1)
        out[name] = {"wgmma": "wgmma.mma_async" in part, "tma": "cp.async.bulk.tensor" in part,
                     "mma": "mma.sync" in part}
    return out


def _split_top(s: str, sep: str) -> list[str]:
    """Split at ``sep`` outside <>, () and []."""
    out, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith(sep, i) and depth == 0:
            out.append(cur)
            cur, i = "", i + len(sep)
            continue
        c = s[i]
        if c in "<([":
            depth += 1
        elif c in ">)]":
            depth -= 1
        cur += c
        i += 1
    out.append(cur)
    return out


def short_name(demangled: str) -> tuple[str, list[str]]:
    """``void s2::(anonymous namespace)::k<__nv_bfloat16, 8, 1>(...)`` -> (``k<bf16, 8, 1>``,
    ``["bf16", "8", "1"]``)."""
    s = demangled.strip()
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    for i, c in enumerate(s):  # cut the parameter list: the first '(' outside <>
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and not s[:i].endswith("::"):
            s = s[:i]
            break
    s = _split_top(s, "::")[-1]
    for long, short in (("__nv_bfloat16", "bf16"), ("__half", "fp16")):
        s = s.replace(long, short)
    args: list[str] = []
    if "<" in s and s.endswith(">"):
        args = [a.strip() for a in _split_top(s[s.index("<") + 1:-1], ",")]
    return s, args


# ---- compiling ---------------------------------------------------------------------------------------

def _unit_key(src: Path, root: Path, target: str, nvcc: str) -> str:
    h = hashlib.sha256(f"{_GATE_VERSION}|{_nvcc_version_text(nvcc)}|{' '.join(FLAGS)}|{target}".encode())
    h.update(src.name.encode())
    h.update(src.read_bytes())
    for p in sorted((root / "kernels").glob("*")):
        if p.suffix in (".cuh", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def compile_unit(src: Path, target: str, nvcc: str, root: Path) -> list[dict]:
    """Compile one ``.cu`` for one target; one row per kernel (one failed row if it does not compile)."""
    base = {"kernel": src.stem, "language": "cuda", "module": src.stem, "dtype": None, "config": {},
            "target": target, "compiled": False, "error": None, "registers": None, "spill_bytes": None,
            "shared_bytes": None, "wgmma": False, "tma": False, "mma": False, "spill_stores": None,
            "spill_loads": None, "stack_bytes": None, "barriers": None, "file": src.name, "signature": None,
            "mangled": None, "warnings": []}
    with tempfile.TemporaryDirectory(prefix="s2gate-") as d:
        cmd = [nvcc, *FLAGS, f"-arch={target}", "-cubin", "--keep", "--keep-dir", d, f"-I{root}", str(src),
               "-o", os.path.join(d, src.stem + ".cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        log = r.stdout + r.stderr
        if r.returncode != 0:
            errs = [ln for ln in log.splitlines() if "error" in ln.lower()] or log.splitlines()[-20:]
            return [{**base, "error": "\n".join(errs[:20])[-3000:]}]
        ptx = "".join(p.read_text(errors="replace") for p in Path(d).glob("*.ptx"))
    funcs = parse_ptxas(log)
    feats = ptx_features(ptx)
    names = demangle([f["mangled"] for f in funcs])
    rows = []
    for f in funcs:
        sig = names[f["mangled"]]
        kernel, args = short_name(sig)
        if not f["entry"]:
            kernel = f"(device function) {kernel}"
        feat = feats.get(f["mangled"], {})
        rows.append({**base, "kernel": kernel, "dtype": _DTYPES.get(args[0]) if args else None,
                     "config": {"template": args} if args else {}, "compiled": True,
                     "registers": f["registers"], "spill_bytes": f["spill_stores"] + f["spill_loads"],
                     "shared_bytes": f["shared_bytes"], "wgmma": feat.get("wgmma", False),
                     "tma": feat.get("tma", False), "mma": feat.get("mma", False),
                     "spill_stores": f["spill_stores"], "spill_loads": f["spill_loads"],
                     "stack_bytes": f["stack_bytes"], "barriers": f["barriers"], "signature": sig,
                     "mangled": f["mangled"], "entry": f["entry"], "warnings": f["warnings"]})
    if not rows:  # a translation unit without kernels (should not happen): say so
        rows.append({**base, "compiled": True, "kernel": f"{src.stem} (no kernels)", "registers": 0, "spill_bytes": 0,
                     "shared_bytes": 0, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "barriers": 0})
    return rows


def _cached_unit(src: Path, target: str, nvcc: str, root: Path, use_cache: bool) -> list[dict]:
    folder = cache_dir() / "cuda_gate"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{src.stem}-{target}-{_unit_key(src, root, target, nvcc)}.json"
    if use_cache and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    rows = compile_unit(src, target, nvcc, root)
    if all(r["compiled"] for r in rows):  # failures are not cached (they may be a broken toolchain)
        for old in folder.glob(f"{src.stem}-{target}-*.json"):
            old.unlink(missing_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, path)
    return rows


def run_gate(targets: tuple[str, ...] | list[str] = TARGETS, jobs: int | None = None, use_cache: bool = True,
             files: list[str] | None = None) -> list[dict]:
    """Compile every ``csrc/kernels/*.cu`` (or only the stems in ``files``) for every target, in
    parallel nvcc processes; returns the rows of all kernels. Raises :class:`GateUnavailable` when
    nvcc or the sources are missing."""
    targets = tuple(targets)
    for t in targets:
        if t not in KNOWN_TARGETS:
            raise ValueError(f"target must be one of {KNOWN_TARGETS}, got {t!r}")
    root = csrc_dir()
    if root is None:
        raise GateUnavailable("the CUDA kernel sources (csrc/) are not available")
    nvcc = find_nvcc()
    if nvcc is None:
        raise GateUnavailable("nvcc not found (install the CUDA toolkit, put nvcc on PATH or set CUDA_HOME): "
                              "the CUDA kernels' compile gate is skipped")
    srcs = [p for p in kernel_sources(root) if not files or p.stem in files]
    if not srcs:
        raise GateUnavailable(f"no kernel sources (*.cu) in {root / 'kernels'}")
    units = [(s, t) for s in srcs for t in targets]
    jobs = jobs or max(1, min(len(units), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:  # each job is an nvcc process
        results = list(pool.map(lambda u: _cached_unit(u[0], u[1], nvcc, root, use_cache), units))
    return [r for rows in results for r in sorted(rows, key=lambda r: r["kernel"])]


def clean(r: dict) -> bool:
    """Compiled, no spills, no local stack, static shared memory within 227 KiB."""
    return bool(r["compiled"] and not r["spill_bytes"] and not r["stack_bytes"]
                and (r["shared_bytes"] or 0) <= MAX_SHARED)


def print_report(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    w = max([len(r["kernel"]) for r in rows] + [6]) + 2
    w = min(w, 60)
    print(f"{'kernel':<{w}}{'file':<22}{'target':>8}{'ok':>4}{'regs':>6}{'spill':>7}{'stack':>7}{'smem B':>8}"
          f"{'bar':>5}", file=file)
    for r in rows:
        print(f"{r['kernel'][:w - 1]:<{w}}{r['file'][:21]:<22}{r['target']:>8}{'yes' if r['compiled'] else 'NO':>4}"
              f"{'-' if r['registers'] is None else r['registers']:>6}"
              f"{'-' if r['spill_bytes'] is None else r['spill_bytes']:>7}"
              f"{'-' if r['stack_bytes'] is None else r['stack_bytes']:>7}"
              f"{'-' if r['shared_bytes'] is None else r['shared_bytes']:>8}"
              f"{'-' if r['barriers'] is None else r['barriers']:>5}", file=file)
        if r["error"]:
            for ln in r["error"].splitlines()[:8]:
                print(f"    error: {ln}", file=file)
        for ln in r.get("warnings") or []:
            print(f"    {ln}", file=file)
    bad = [r for r in rows if not clean(r)]
    files = sorted({r["file"] for r in rows})
    print(f"\n{len(rows)} CUDA kernels from {len(files)} files, {len(rows) - len(bad)} clean (compiled, no spills, "
          f"no stack, static shared <= 227 KiB), {len(bad)} not", file=file)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", default=None, help="sm_90a, sm_80 (repeatable; default both)")
    p.add_argument("--file", action="append", default=None, help="only this kernel file stem (repeatable)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-cache", action="store_true")
    a = p.parse_args(argv)
    try:
        rows = run_gate(tuple(a.target or TARGETS), use_cache=not a.no_cache, files=a.file)
    except GateUnavailable as e:
        print(f"sapiens2: {e}", file=sys.stderr)
        return 0
    if a.json:
        print(json.dumps(rows))
    else:
        print_report(rows)
    return 0 if all(clean(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
