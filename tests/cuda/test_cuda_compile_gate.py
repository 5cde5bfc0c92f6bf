"""Compile gate of the hand-written CUDA kernels (``sapiens2.cuda_tools.gate``): every
``csrc/kernels/*.cu`` compiles with nvcc for sm_90a and sm_80 (no GPU needed), and every kernel has
no register spills, no local stack frame and at most 227 KiB of static shared memory. Skips when
nvcc is missing. The first run compiles each file twice (~5 s per file and target on 2 cores, the
files in parallel); results are cached per file content, so later runs take a second."""

import json

import pytest

from sapiens2.cli import main
from sapiens2.cuda_tools import gate
from sapiens2.cuda_tools.sources import csrc_dir, kernel_sources

KEYS = {"kernel", "language", "module", "dtype", "config", "target", "compiled", "error", "registers", "spill_bytes",
        "shared_bytes", "wgmma", "tma", "spill_stores", "spill_loads", "stack_bytes", "barriers", "file"}

needs_nvcc = pytest.mark.skipif(gate.find_nvcc() is None, reason="nvcc not found (no CUDA toolkit)")


@pytest.fixture(scope="module")
def rows():
    try:
        return gate.run_gate(gate.TARGETS)
    except gate.GateUnavailable as e:
        pytest.skip(str(e))


@needs_nvcc
def test_every_kernel_file_compiles_for_both_archs(rows):
    files = {p.name for p in kernel_sources(csrc_dir())}
    assert files and "rms_norm.cu" in files
    for target in gate.TARGETS:
        got = {r["file"] for r in rows if r["target"] == target}
        assert got == files, (target, files - got)
    failed = {(r["file"], r["target"]): r["error"] for r in rows if not r["compiled"]}
    assert not failed, "\n\n".join(f"{f} ({t}):\n{e}" for (f, t), e in failed.items())
    for r in rows:
        assert KEYS <= set(r), r
        assert r["language"] == "cuda" and r["target"] in gate.TARGETS
        assert 0 < r["registers"] <= 255, r
    # the RMSNorm file's kernels, demangled and shortened, in all three dtypes
    names = {r["kernel"] for r in rows if r["file"] == "rms_norm.cu"}
    for want in ("rms_norm_fwd_kernel<bf16, 2, 8>", "rms_norm_bwd_kernel<fp16, 1, 8>", "column_sum_kernel<float>"):
        assert want in names, sorted(names)
    assert {r["dtype"] for r in rows if r["file"] == "rms_norm.cu"} == {"bf16", "fp16", "fp32"}


@needs_nvcc
def test_no_spills_no_stack_shared_within_227k(rows):
    bad = [f"{r['file']} {r['target']} {r['kernel']}: {r['registers']} regs, spill stores/loads "
           f"{r['spill_stores']}/{r['spill_loads']} B, stack {r['stack_bytes']} B, static smem {r['shared_bytes']} B"
           for r in rows if r["compiled"] and not gate.clean(r)]
    assert not bad, "\n".join(bad)


@needs_nvcc
def test_cli_report_shows_cuda_rows(rows, capsys):
    assert main(["kernels", "report", "--language", "cuda", "--target", "sm_80"]) in (0, 1)
    out = capsys.readouterr().out
    assert "CUDA kernels (csrc/kernels, sm_80" in out
    assert "rms_norm_fwd_kernel<bf16, 2, 8>" in out and "rms_norm.cu" in out and "CUDA kernels from" in out
    code = main(["kernels", "report", "--language", "cuda", "--target", "sm_90a", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got and all(r["language"] == "cuda" and r["target"] == "sm_90a" for r in got)
    assert code == (0 if all(gate.clean(r) for r in got) else 1)


def test_cli_says_when_nvcc_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(gate, "find_nvcc", lambda: None)
    assert main(["kernels", "report", "--language", "cuda"]) == 0
    assert "nvcc not found" in capsys.readouterr().out
    assert main(["kernels", "report", "--language", "cuda", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == [] and "nvcc not found" in cap.err


@needs_nvcc
def test_a_compile_error_is_a_failed_row(tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text('#include "kernels/device_common.cuh"\n__global__ void k(float* x) { x[0] = undeclared; }\n')
    (row,) = gate.compile_unit(src, "sm_80", gate.find_nvcc(), csrc_dir())
    assert not row["compiled"] and "undeclared" in row["error"] and row["file"] == "broken.cu"
    assert not gate.clean(row)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _Z6helperPf
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_ZN2s26kernelI13__nv_bfloat16Li8EEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN2s26kernelI13__nv_bfloat16Li8EEEvPKT_
    16 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 144 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 9.218 ms
ptxas info    : Compiling entry function '_Z5otherPf' for 'sm_90a'
ptxas info    : Function properties for _Z5otherPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers
"""


def test_parse_ptxas():
    funcs = {f["mangled"]: f for f in gate.parse_ptxas(PTXAS_LOG)}
    k = funcs["_ZN2s26kernelI13__nv_bfloat16Li8EEEvPKT_"]
    assert k["entry"] and (k["registers"], k["barriers"], k["shared_bytes"]) == (255, 1, 144)
    assert (k["stack_bytes"], k["spill_stores"], k["spill_loads"]) == (16, 12, 4)
    o = funcs["_Z5otherPf"]
    assert (o["registers"], o["barriers"], o["shared_bytes"], o["stack_bytes"]) == (28, 0, 0, 0)
    h = funcs["_Z6helperPf"]  # a non-inlined device function with a stack frame is reported too
    assert not h["entry"] and h["stack_bytes"] == 24 and h["registers"] is None


def test_short_name_and_ptx_features():
    assert gate.short_name("void s2::(anonymous namespace)::rms_norm_fwd_kernel<__nv_bfloat16, 8, 1>(__nv_bfloat16 "
                           "const*, long)") == ("rms_norm_fwd_kernel<bf16, 8, 1>", ["bf16", "8", "1"])
    assert gate.short_name("void s2::k<s2::Cfg<__half, 2>, 4>(s2::Shape)") == ("k<s2::Cfg<fp16, 2>, 4>",
                                                                             ["s2::Cfg<fp16, 2>", "4"])
    assert gate.short_name("plain") == ("plain", [])
    ptx = (".visible .entry _Z1av(\n)\n{\n wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;\n}\n"
           ".visible .entry _Z1bv(\n)\n{\n mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ...;\n"
           " cp.async.bulk.tensor.2d.shared::cluster.global ...;\n}\n")
    f = gate.ptx_features(ptx)
    assert f["_Z1av"] == {"wgmma": True, "tma": False, "mma": False}
    assert f["_Z1bv"] == {"wgmma": False, "tma": True, "mma": True}
