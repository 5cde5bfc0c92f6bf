"""Build script.

The pure-Python package (``sapiens2`` plus ``kernels/`` installed as ``sapiens2.kernels``) always
installs, with the CUDA kernel sources of ``csrc/{kernels,emu,bindings}`` as package data
``sapiens2/_csrc/...`` (so the compile gate and the CPU emulation work from a wheel too). The
optional compiled extension ``sapiens2._C`` (sm_80 + sm_90a SASS, compute_90 PTX) is built from ``csrc/`` when

* ``SAPIENS2_BUILD_CUDA`` is not ``0``,
* the installed torch is a CUDA build, and
* a CUDA toolkit (``nvcc``) is found,

and ``csrc/`` holds kernel sources. ``SAPIENS2_BUILD_CUDA=1`` makes the extension required (the
install fails instead of skipping); unset, a missing toolkit or a CPU torch skips it with a message
(``pip install -v`` shows it; ``sapiens2 info`` says whether it is built). With nvcc present, a
compile error fails the install. Install without build isolation
(``pip install --no-build-isolation .``) so the extension is compiled against the torch that is
already installed rather than a second copy pulled into an isolated build environment.

Compiles run in parallel through ninja when it is available (``pip install ninja``; ``MAX_JOBS``
caps the parallel jobs), otherwise one after another.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sapiens2", "sapiens2.kernels"] + [
    "sapiens2." + os.path.relpath(d, os.path.join(HERE, "sapiens2")).replace(os.sep, ".")
    for d in glob.glob(os.path.join(HERE, "sapiens2", "*", ""))
    if os.path.exists(os.path.join(d, "__init__.py"))
]
# The kernel sources, shipped as data: data-only packages (no __init__.py) mapped from csrc/.
CSRC_DIRS = {"sapiens2._csrc": "csrc", "sapiens2._csrc.kernels": "csrc/kernels", "sapiens2._csrc.emu": "csrc/emu",
             "sapiens2._csrc.bindings": "csrc/bindings"}
CSRC_DATA = {
    "sapiens2._csrc": ["README.md"],
    "sapiens2._csrc.kernels": ["*.cu", "*.cuh", "*.h"],
    "sapiens2._csrc.emu": ["*.h", "*.cpp"],
    "sapiens2._csrc.bindings": ["*.h", "*.cpp"],
}
ARCHS = ("80", "90a")


def _say(msg: str) -> None:
    print(f"sapiens2: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """The CUDA toolkit root (with include/cuda_runtime_api.h), or None.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on PATH is a
    wrapper (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc): ask nvcc itself."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if os.path.exists(os.path.join(env, "bin", "nvcc")):
            return env
        _say(f"warning: CUDA_HOME/CUDA_PATH={env} has no bin/nvcc; looking for nvcc elsewhere")
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        return None
    cands = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
        if top:  # "#$ TOP=/usr/local/cuda-13.0/bin/.."
            cands.insert(0, os.path.normpath(top.group(1).strip().strip('"')))
    except (OSError, subprocess.SubprocessError):
        pass
    cands.append("/usr/local/cuda")
    for c in cands:
        c = os.path.normpath(c)
        if os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")) and os.path.exists(
                os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _math_library_includes(cuda_home: str) -> list:
    """Header folders of the CUDA math libraries (cuBLAS, cuSPARSE, cuSOLVER) that torch's
    ATen/cuda/CUDAContext.h includes, when the toolkit lacks them (a minimal toolkit with just nvcc
    and cudart): torch's own pip CUDA wheels carry them (site-packages/nvidia/*/include). The
    bindings avoid that header today; this keeps a binding that needs it building."""
    need = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
    missing = [h for h in need if not os.path.exists(os.path.join(cuda_home, "include", h))]
    if not missing:
        return []
    try:
        import nvidia

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    dirs = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in missing) and inc not in dirs:
                dirs.append(inc)
    return dirs


def _cuda_extension():
    """Return ([ext], cmdclass) for the CUDA extension, or ([], {}) with a message saying why not."""
    mode = os.environ.get("SAPIENS2_BUILD_CUDA", "auto")

    def skip(why: str):
        if mode == "1":
            raise RuntimeError(f"sapiens2: SAPIENS2_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        _say(f"skipping the CUDA extension sapiens2._C: {why}")
        return [], {}

    if mode == "0":
        _say("SAPIENS2_BUILD_CUDA=0, skipping the CUDA extension sapiens2._C")
        return [], {}
    # Kernels (torch-free .cu) + thin torch bindings; csrc/emu is the CPU emulation, not built here.
    kernels = sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    bindings = sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp")))
    if not bindings or not kernels:
        return skip("csrc/ has no kernels or no torch bindings")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset)")
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available
    except ImportError as e:
        return skip(f"torch is not importable at build time ({e}); install torch first and use "
                    "pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    try:  # the ninja wheel's binary is not on PATH unless the virtual environment is activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    use_ninja = is_ninja_available()
    # after the toolkit's own headers (-idirafter), for the bindings only (the kernels need none)
    math_includes = [f for d in _math_library_includes(cuda_home) for f in ("-idirafter", d)]
    # SASS for sm_80 and sm_90a, plus compute_90 PTX that newer GPUs (sm_100, sm_120) JIT-compile:
    # the kernels use no sm_90a-only feature.
    arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] + [
        "-gencode=arch=compute_90,code=compute_90"]
    ext = CUDAExtension(
        name="sapiens2._C",
        sources=kernels + bindings,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            # the bindings include the torch headers, which need C++20 (-g0: Python's CFLAGS carry -g, whose
            # debug info for the torch templates doubles the compile time); the kernels are torch-free C++17
            "cxx": ["-O3", "-std=c++20", "-g0"] + math_includes,
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + arch_flags,
        },
    )

    class Build(BuildExtension):
        def run(self):
            jobs = os.environ.get("MAX_JOBS", "ninja default" if use_ninja else "1")
            _say(f"building sapiens2._C from {len(kernels)} kernel files + {len(bindings)} bindings for "
                 f"sm_{' + sm_'.join(ARCHS)} (CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}, "
                 f"{'ninja, jobs: ' + jobs if use_ninja else 'no ninja: one compile at a time (pip install ninja)'})")
            t0 = time.perf_counter()
            super().run()
            _say(f"built sapiens2._C in {time.perf_counter() - t0:.0f} s")

    return [ext], {"build_ext": Build.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=PACKAGES + ["sapiens2.data"] + list(CSRC_DIRS),
    package_dir={"sapiens2": "sapiens2", "sapiens2.kernels": "kernels", **CSRC_DIRS},
    package_data={"sapiens2.data": ["*.json"], **CSRC_DATA},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
