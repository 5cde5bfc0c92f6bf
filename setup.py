"""Build script.

The pure-Python package (``sapiens2`` plus ``kernels/`` installed as ``sapiens2.kernels``) always
installs. The optional compiled extension ``sapiens2._C`` is built from ``csrc/`` only when

* ``SAPIENS2_BUILD_CUDA`` is not ``0``,
* the installed torch is a CUDA build, and
* a CUDA toolkit (``nvcc``) is found,

and ``csrc/`` holds kernel sources. Install without build isolation
(``pip install --no-build-isolation .``) so the extension is compiled against the torch that is
already installed rather than a second copy pulled into an isolated build environment.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sapiens2", "sapiens2.kernels"] + [
    "sapiens2." + os.path.relpath(d, os.path.join(HERE, "sapiens2")).replace(os.sep, ".")
    for d in glob.glob(os.path.join(HERE, "sapiens2", "*", ""))
    if os.path.exists(os.path.join(d, "__init__.py"))
]


def _cuda_extension():
    """Return ([ext], cmdclass) for the CUDA extension, or ([], {}) with a message saying why not."""
    if os.environ.get("SAPIENS2_BUILD_CUDA", "1") == "0":
        print("sapiens2: SAPIENS2_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    # Kernels (torch-free .cu) + thin torch bindings; csrc/emu is the CPU emulation, not built here.
    bindings = sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp")))
    sources = sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu"))) + bindings
    if not bindings:
        print("sapiens2: csrc/bindings has no torch bindings, no CUDA extension to build", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("sapiens2: torch not importable at build time, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print(
            "sapiens2: no CUDA toolkit or CPU-only torch "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}), skipping the CUDA extension",
            file=sys.stderr,
        )
        return [], {}
    arch_flags = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    ext = CUDAExtension(
        name="sapiens2._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"] + arch_flags,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=PACKAGES,
    package_dir={"sapiens2": "sapiens2", "sapiens2.kernels": "kernels"},
    package_data={"sapiens2": ["data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
