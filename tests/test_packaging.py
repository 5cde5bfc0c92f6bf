"""``pip install .`` (non-editable, no build isolation) gives ``sapiens2`` with ``sapiens2.kernels``
and its data, the CUDA kernel sources as ``sapiens2/_csrc`` (for the compile gate and the CPU
emulation), and no top-level ``kernels`` module (that name belongs to another PyPI package)."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_non_editable_install(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "SAPIENS2_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target",
                    str(target), ROOT], check=True, env=env, capture_output=True, cwd=tmp_path)
    assert (target / "sapiens2" / "kernels" / "attention.py").exists()
    assert (target / "sapiens2" / "data" / "model_card.json").exists()
    assert not (target / "kernels").exists()
    code = ("import sapiens2, sapiens2.kernels.rms_norm as k; from sapiens2.flops import zoo_table; "
            "assert k.__file__.startswith(%r); print(len(zoo_table()))" % str(target))
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "6"
    # the CUDA sources: every kernel, header, emulation and binding file of the checkout
    want = [os.path.relpath(p, os.path.join(ROOT, "csrc")) for sub, pats in
            (("kernels", ("*.cu", "*.cuh", "*.h")), ("emu", ("*.h", "*.cpp")), ("bindings", ("*.h", "*.cpp")))
            for pat in pats for p in glob.glob(os.path.join(ROOT, "csrc", sub, pat))]
    assert "kernels/rms_norm.cu" in want and "emu/cuda_emu.h" in want and "bindings/module.cpp" in want
    missing = [w for w in want if not (target / "sapiens2" / "_csrc" / w).is_file()]
    assert not missing, missing
    assert not list((target / "sapiens2").glob("_C*.so")), "SAPIENS2_BUILD_CUDA=0 must not build the extension"
    # the installed package finds its own copy, and the emulation builds from it
    code = ("from sapiens2.cuda_tools import emu, sources; root = sources.csrc_dir(); print(root); "
            "print(emu.build(sources=[root / 'kernels' / 'rms_norm.cu']).exists())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(target),
                                                            "SAPIENS2_CACHE": str(tmp_path / "cache")},
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(target / "sapiens2" / "_csrc"), "True"], out
