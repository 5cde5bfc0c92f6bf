"""The torch bindings of ``csrc/bindings`` built against the CPU emulation of the kernels.

``load()`` compiles ``csrc/bindings/*.cpp`` and every ``csrc/kernels/*.cu`` with the host compiler
and ``-DSAPIENS2_EMU`` into one library loaded with ``torch.ops.load_library``: the ops appear
as ``torch.ops.sapiens2_emu.*`` on CPU tensors, with exactly the argument checks, allocations
and launches of the real ``sapiens2_cuda`` ops. ``sapiens2.ops.cuda.emulated()`` points the
``"cuda"`` backend at them, so the tests run op -> binding -> kernel (and ``opcheck``, autograd)
without a GPU. Cached by a hash of the sources, the flags and the torch version.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .emu import EmulationUnavailable, _compiler
from .sources import cache_dir, csrc_dir, kernel_sources, source_hash

_loaded: Path | None = None


def _flags(root: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-DSAPIENS2_EMU", "-Wno-unknown-pragmas", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-I{root}", f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in include_paths()])


def build() -> Path:
    root = csrc_dir()
    if root is None:
        raise EmulationUnavailable("the CUDA kernel sources (csrc/) are not available")
    cxx = _compiler()
    flags = _flags(root)
    bindings = sorted((root / "bindings").glob("*.cpp"))
    key = source_hash(root, " ".join([cxx, torch.__version__] + flags) + "".join(p.read_text() for p in bindings))
    out = cache_dir() / f"sapiens2_emu_ext-{key}.so"
    if out.exists():
        return out
    from torch.utils.cpp_extension import library_paths

    with tempfile.TemporaryDirectory() as tmp:
        # The kernels compile as C++ through one unit that includes them (torch-free, fast).
        kunit = Path(tmp) / "kernels_emu.cpp"
        kunit.write_text("".join(f'#include "{p}"\n' for p in kernel_sources(root)))
        # the emulator's C API too: the launch log (launch_log below) is read through it
        units = bindings + [kunit, root / "emu" / "emu_capi.cpp"]

        def compile_one(src: Path) -> Path:
            obj = Path(tmp) / (src.stem + ".o")
            r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulation build of {src.name} failed:\n{r.stderr[-6000:]}")
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objs = list(pool.map(compile_one, units))
        libs = [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
        rpath = [f"-Wl,-rpath,{p}" for p in library_paths()]
        r = subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(out) + ".tmp", *libs, *rpath],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{r.stderr[-4000:]}")
        os.replace(str(out) + ".tmp", out)
    return out


def load() -> None:
    """Build if needed and load the emulated ops into ``torch.ops.sapiens2_emu`` (once)."""
    global _loaded
    if _loaded is None:
        path = build()
        torch.ops.load_library(str(path))
        from sapiens2.ops.cuda import fakes

        fakes.register("sapiens2_emu")
        _loaded = path


@dataclass
class LoggedLaunch:
    """One emulated launch: the kernel's name and the merged ``[lo, hi)`` address ranges of the
    distinct bytes it read and wrote."""

    kernel: str
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)


_capi_lib: ctypes.CDLL | None = None


def _capi() -> ctypes.CDLL:
    """The loaded extension itself through ctypes (same handle, same emulator state), once."""
    global _capi_lib
    if _capi_lib is None:
        lib = ctypes.CDLL(str(_loaded))
        lib.s2emu_log_kernel.restype = ctypes.c_char_p
        lib.s2emu_log_ranges.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        _capi_lib = lib
    return _capi_lib


@contextlib.contextmanager
def launch_log() -> Iterator[list[LoggedLaunch]]:
    """``with launch_log() as launches: torch.ops.sapiens2_emu.<op>(...)``: on exit ``launches``
    holds every kernel the emulated ops launched inside the block, in order (the launch-plan tests'
    ground truth for the CUDA kernels)."""
    load()
    lib = _capi()
    launches: list[LoggedLaunch] = []
    lib.s2emu_log_start()
    try:
        yield launches
    finally:
        lib.s2emu_log_stop()
        for i in range(lib.s2emu_log_size()):
            rec = LoggedLaunch(lib.s2emu_log_kernel(i).decode())
            for write, out in ((0, rec.reads), (1, rec.writes)):
                n = lib.s2emu_log_ranges(i, write, None, 0)
                buf = (ctypes.c_uint64 * (2 * n))()
                lib.s2emu_log_ranges(i, write, buf, n)
                out.extend((int(buf[2 * j]), int(buf[2 * j + 1])) for j in range(n))
            launches.append(rec)
