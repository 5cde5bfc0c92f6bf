"""Run the CUDA kernels of ``csrc/kernels`` on the CPU through the emulation header.

The same ``.cu`` sources that nvcc compiles for sm_80 / sm_90a are compiled here by the host C++
compiler with ``-DSAPIENS2_EMU`` (``csrc/emu/cuda_emu.h`` supplies threads, barriers, shared
memory and warp shuffles), linked into one shared library and called through its C API with
ctypes. Tensors are CPU tensors; the emulator also counts the global-memory bytes every kernel
reads and writes per tracked buffer::

    lib = emu.load()
    with emu.Traffic(x=x, y=y) as t:
        lib.call("s2_rms_norm_fwd", ...)
    t["x"].reads_each_byte  # (min, max) times any byte of x was read

``load(threads=True)`` builds the host-thread variant (one OS thread per CUDA thread); add
``sanitize=True`` for ThreadSanitizer, which then reports a missing ``__syncthreads`` as a data
race. The TSAN runtime must be in the process from its start, so run such code in a process
started with :func:`tsan_env` (``LD_PRELOAD`` of the compiler's libtsan)::

    LD_PRELOAD=$(g++ -print-file-name=libtsan.so) python my_check.py   # my_check: emu.load(True, True)

``sources`` picks the kernel files to build (default: every ``csrc/kernels/*.cu``), e.g. one
kernel plus a test kernel from ``csrc/tests``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .sources import cache_dir, csrc_dir, kernel_sources, source_hash

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class EmulationUnavailable(RuntimeError):
    """No C++ compiler or no kernel sources: the emulation tests skip with this reason."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise EmulationUnavailable("no C++ compiler (g++) found for the CUDA emulation build")
    return cxx


def build(threads: bool = False, sanitize: bool = False, sources: list[Path] | tuple[Path, ...] | None = None) -> Path:
    """Compile (or reuse, keyed by a hash of the sources and flags) the emulation library of
    ``sources`` (default: every kernel file) and the emulator's C API."""
    root = csrc_dir()
    if root is None:
        raise EmulationUnavailable("the CUDA kernel sources (csrc/) are not available")
    cxx = _compiler()
    flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DSAPIENS2_EMU", "-Wall", "-Wno-unknown-pragmas",
             f"-I{root}"]
    if threads:
        flags += ["-DSAPIENS2_EMU_THREADS", "-pthread"]
    if sanitize:
        flags += ["-fsanitize=thread", "-g", "-O1"]
    units = [Path(p) for p in (kernel_sources(root) if sources is None else sources)]
    chosen = "".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in units)
    key = source_hash(root, " ".join([cxx] + flags) + chosen)
    out = cache_dir() / f"libs2emu-{key}.so"
    if out.exists():
        return out
    units.append(root / "emu" / "emu_capi.cpp")
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(i_src: tuple[int, Path]) -> Path:
            i, src = i_src
            obj = Path(tmp) / f"{i}_{src.stem}.o"
            r = subprocess.run([cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulation build of {src.name} failed:\n{r.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objs = list(pool.map(compile_one, enumerate(units)))
        tmp_out = f"{out}.tmp{os.getpid()}"
        link = [cxx, "-shared", *objs, "-o", tmp_out] + (["-fsanitize=thread"] if sanitize else []) + (
            ["-pthread"] if threads else [])
        r = subprocess.run([str(a) for a in link], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{r.stderr}")
        os.replace(tmp_out, out)
    return out


def tsan_runtime() -> str | None:
    """Path of the compiler's ThreadSanitizer runtime (libtsan.so), or None."""
    try:
        r = subprocess.run([_compiler(), "-print-file-name=libtsan.so"], capture_output=True, text=True)
    except (OSError, EmulationUnavailable):
        return None
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def tsan_env(**extra: str) -> dict[str, str]:
    """Environment for a process that loads ``load(threads=True, sanitize=True)``: libtsan
    preloaded, reports to stderr, exit status 66 after a report."""
    lib = tsan_runtime()
    if lib is None:
        raise EmulationUnavailable("no ThreadSanitizer runtime (libtsan.so) for the host compiler")
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env["TSAN_OPTIONS"] = " ".join(p for p in ("halt_on_error=0 exitcode=66 second_deadlock_stack=1",
                                                env.get("TSAN_OPTIONS", "")) if p)
    env.update(extra)
    return env


def _tsan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libtsan" in f.read()
    except OSError:
        return False


def _arg(a):
    """ctypes argument for a Python value: tensors by data pointer, None as NULL."""
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError("the emulation runs on CPU tensors")
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, bool):
        return ctypes.c_int(int(a))
    if isinstance(a, int):
        return ctypes.c_int64(a)
    if isinstance(a, float):
        return ctypes.c_float(a)
    raise TypeError(f"unsupported argument {a!r}")


class EmuLibrary:
    """The loaded emulation library; ``call(name, *args)`` runs one launcher and raises with the
    emulator's message (deadlock, out-of-bounds access, ...) when it fails."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.s2emu_last_error.restype = ctypes.c_char_p
        self._lib.s2emu_track.restype = ctypes.c_int
        self._lib.s2emu_track.argtypes = [ctypes.c_void_p, ctypes.c_uint64]

    def fn(self, name: str):
        return getattr(self._lib, name)

    def call(self, name: str, *args, int_args: tuple[int, ...] = ()) -> None:
        """Call launcher ``name``. Integers are passed as int64 except at the positions listed in
        ``int_args`` (C ``int`` parameters: dtype codes, flags, program counts)."""
        conv = [ctypes.c_int(a) if i in int_args else _arg(a) for i, a in enumerate(args)]
        status = self.fn(name)(*conv)
        if status != 0:
            msg = self._lib.s2emu_last_error().decode()
            self._lib.s2emu_reset()
            raise RuntimeError(f"{name} returned status {status}" + (f": {msg}" if msg else ""))

    def set_reverse(self, reverse: bool) -> None:
        self._lib.s2emu_set_reverse(ctypes.c_int(int(reverse)))


_loaded: dict[tuple, EmuLibrary] = {}


def load(threads: bool = False, sanitize: bool = False,
         sources: list[Path] | tuple[Path, ...] | None = None) -> EmuLibrary:
    """Build if needed and load the emulation library (once per variant and source list).
    ``sanitize=True`` needs a process started with :func:`tsan_env` (libtsan preloaded)."""
    key = (threads, sanitize, None if sources is None else tuple(str(p) for p in sources))
    if key not in _loaded:
        if sanitize and not _tsan_loaded():
            raise EmulationUnavailable(
                "the ThreadSanitizer build can only be loaded into a process started with the TSAN runtime "
                f"preloaded: LD_PRELOAD={tsan_runtime() or '$(g++ -print-file-name=libtsan.so)'} python ... "
                "(sapiens2.cuda_tools.emu.tsan_env() gives that environment for a subprocess)")
        _loaded[key] = EmuLibrary(build(threads, sanitize, sources))
    return _loaded[key]


@dataclass
class BufferTraffic:
    nbytes: int
    read_bytes: int
    write_bytes: int
    reads_each_byte: tuple[int, int]  # (least, most) times any byte was read
    writes_each_byte: tuple[int, int]


class Traffic:
    """Context manager: track the named CPU tensors' storage while kernels run; afterwards
    ``t[name]`` is a :class:`BufferTraffic` and ``t.untracked`` the bytes touched elsewhere."""

    def __init__(self, lib: EmuLibrary, **tensors: torch.Tensor | None):
        self.lib = lib
        self.tensors = {k: v for k, v in tensors.items() if v is not None and v.numel() > 0}
        self.stats: dict[str, BufferTraffic] = {}
        self.untracked = (0, 0)

    def __enter__(self):
        L = self.lib._lib
        L.s2emu_reset()
        self._ids = {k: L.s2emu_track(ctypes.c_void_p(t.data_ptr()), ctypes.c_uint64(t.numel() * t.element_size()))
                     for k, t in self.tensors.items()}
        return self

    def __exit__(self, *exc):
        L = self.lib._lib
        for k, i in self._ids.items():
            rb, wb = ctypes.c_uint64(), ctypes.c_uint64()
            lo_r, hi_r, lo_w, hi_w = (ctypes.c_uint32() for _ in range(4))
            L.s2emu_stats(ctypes.c_int(i), ctypes.byref(rb), ctypes.byref(wb), ctypes.byref(lo_r), ctypes.byref(hi_r),
                          ctypes.byref(lo_w), ctypes.byref(hi_w))
            t = self.tensors[k]
            self.stats[k] = BufferTraffic(t.numel() * t.element_size(), rb.value, wb.value, (lo_r.value, hi_r.value),
                                          (lo_w.value, hi_w.value))
        ur, uw = ctypes.c_uint64(), ctypes.c_uint64()
        L.s2emu_untracked(ctypes.byref(ur), ctypes.byref(uw))
        self.untracked = (ur.value, uw.value)
        L.s2emu_reset()
        return False

    def __getitem__(self, name: str) -> BufferTraffic:
        return self.stats[name]
