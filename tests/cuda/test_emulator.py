"""The CPU emulation of CUDA itself (csrc/emu/cuda_emu.h), which every CUDA-kernel test relies on:

* ``csrc/tests/test_emulator.cpp`` (barriers, indices, every shuffle kind and width against the PTX
  definition, ballot, dynamic shared memory, reverse order, byte accounting, deadlock and
  out-of-bounds reports, bad launches) compiled with g++ directly (no CMake) in both builds, the
  fiber scheduler and the host-thread one, and run;
* a reduction missing its ``__syncthreads`` (``csrc/tests/racy_kernels.cu``) gives a result that
  depends on the thread order in the fiber build, and (``slow``) is reported as a data race by
  ThreadSanitizer in the host-thread build while the RMSNorm kernels run clean there.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sapiens2.cuda_tools import emu
from sapiens2.cuda_tools.sources import csrc_dir

ROOT = csrc_dir()
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(ROOT is None or not (ROOT / "tests").is_dir() or CXX is None,
                                reason="needs the csrc/ checkout (with csrc/tests) and a C++ compiler")
VARIANTS = {"fibers": [], "threads": ["-DSAPIENS2_EMU_THREADS", "-pthread"]}


@pytest.fixture(scope="module")
def selftest_binaries(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu_selftest")

    def build(variant):
        exe = out / f"test_emulator_{variant}"
        cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", "-DSAPIENS2_EMU", *VARIANTS[variant],
               f"-I{ROOT}", str(ROOT / "tests" / "test_emulator.cpp"), "-o", str(exe)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
        return variant, exe

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, VARIANTS))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_emulator_selftests(selftest_binaries, variant):
    # A divergent __syncthreads must come back as an error, not hang: the timeout would catch a hang.
    r = subprocess.run([str(selftest_binaries[variant])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert " 0 failed checks" in r.stdout and "[  FAILED ]" not in r.stdout, r.stdout[-3000:]
    assert "divergent_syncthreads_is_reported_as_a_deadlock" in r.stdout


def test_selftest_failure_gives_nonzero_exit(selftest_binaries):
    """A filter that selects no test is a failure too (a renamed test must not pass silently)."""
    r = subprocess.run([str(selftest_binaries["fibers"]), "no_such_test"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "0 tests" in r.stdout


@pytest.fixture(scope="module")
def racy_lib():
    try:
        return emu.load(sources=[ROOT / "tests" / "racy_kernels.cu"])
    except emu.EmulationUnavailable as e:
        pytest.skip(str(e))


def test_missing_barrier_shows_in_the_schedule(racy_lib):
    """Fiber build: with its barriers the reduction is right in both thread orders; without them,
    the forward order (thread 0 runs to the end before the others store) reads stale shared memory."""
    g = torch.Generator().manual_seed(0)
    results = {}
    for with_barrier in (1, 0):
        for reverse in (False, True):
            x = torch.randn(3, 128, generator=g)
            out = torch.full((3,), float("nan"))
            racy_lib.set_reverse(reverse)
            try:
                racy_lib.call("s2test_block_sum", x, out, 3, 128, with_barrier, int_args=(3, 4))
            finally:
                racy_lib.set_reverse(False)
            results[with_barrier, reverse] = torch.allclose(out, x.sum(1), atol=1e-4)
    assert results[1, False] and results[1, True]
    assert not results[0, False]


_TSAN_DRIVER = textwrap.dedent("""
    import sys
    import torch
    from sapiens2.cuda_tools import emu
    from sapiens2.cuda_tools.sources import csrc_dir

    root = csrc_dir()
    lib = emu.load(threads=True, sanitize=True,
                   sources=[root / "kernels" / "rms_norm.cu", root / "tests" / "racy_kernels.cu"])
    if sys.argv[1] == "rms_norm":
        # forward and backward with residual, LayerScale and an incoming stream gradient; fp32
        # (vectorised) and bf16 with a width that is not a multiple of 8 (scalar path)
        for dt, code, C in ((torch.float32, 0, 384), (torch.bfloat16, 2, 300)):
            M, P = 5, 2
            x, r, dy, dh = (torch.randn(M, C).to(dt) for _ in range(4))
            w, s = torch.randn(C).to(dt), torch.randn(C).to(dt)
            y, h, dx, dres = (torch.empty(M, C, dtype=dt) for _ in range(4))
            rstd, dwp, dsp, dw = torch.empty(M), torch.empty(P, C), torch.empty(P, C), torch.empty(C, dtype=dt)
            lib.call("s2_rms_norm_fwd", code, code, x, r, s, w, y, h, rstd, M, C, 1e-6, P, None, int_args=(0, 1, 12))
            lib.call("s2_rms_norm_bwd", code, code, dy, dh, x, h, s, w, rstd, dx, dres, dwp, dsp, M, C, P, None,
                     int_args=(0, 1, 15))
            lib.call("s2_column_sum", code, dwp, dw, P, C, None, int_args=(0,))
        x, out = torch.randn(3, 256), torch.empty(3)
        lib.call("s2test_block_sum", x, out, 3, 256, 1, int_args=(3, 4))  # with its barriers: clean
        assert torch.allclose(out, x.sum(1), atol=1e-4)
    else:
        x, out = torch.randn(2, 128), torch.empty(2)
        lib.call("s2test_block_sum", x, out, 2, 128, 0, int_args=(3, 4))
    print("driver done", file=sys.stderr)
""")


@pytest.mark.slow
def test_tsan_reports_the_missing_barrier_and_not_rmsnorm(tmp_path):
    """Host-thread build under ThreadSanitizer (~35 s cold on 2 cores, ~15 s cached): the reduction
    without barriers is a reported data race in that kernel; the RMSNorm kernels and the reduction
    with its barriers run clean."""
    try:
        env = emu.tsan_env(PYTHONPATH=os.pathsep.join(sys.path))
    except emu.EmulationUnavailable as e:
        pytest.skip(str(e))
    probe = subprocess.run([CXX, "-fsanitize=thread", "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=thread: {probe.stderr[-500:]}")
    driver = tmp_path / "tsan_driver.py"
    driver.write_text(_TSAN_DRIVER)

    def run(which):
        return subprocess.run([sys.executable, str(driver), which], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    clean = run("rms_norm")  # also builds the library, so run it first
    assert clean.returncode == 0 and "driver done" in clean.stderr, clean.stderr[-6000:]
    assert "ThreadSanitizer" not in clean.stderr, clean.stderr[-6000:]
    racy = run("racy")
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr, racy.stderr[-6000:]
    assert "racy_kernels.cu" in racy.stderr and "block_sum_kernel" in racy.stderr, racy.stderr[-6000:]
    assert racy.returncode == 66  # TSAN's exit status after a report (tsan_env sets exitcode=66)
