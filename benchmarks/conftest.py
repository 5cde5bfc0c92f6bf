"""Microbenchmarks (pytest-benchmark): every op per backend at the real Sapiens2 shapes on a GPU,
against the baselines present on the machine. On a CPU only the reference backend runs, at a
reduced shape, and results are marked ``cpu`` (the Triton interpreter is never timed).

    pytest benchmarks --benchmark-only                   # all
    pytest benchmarks -k attention --benchmark-json out.json
"""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
N_REAL = 3081  # 1 CLS + 8 registers + 3072 patches (1024x768 / 16)
N = N_REAL if ON_GPU else 265  # CPU: a reduced token count, same widths
# (arch, width, heads, kv heads of the GQA layers, head dim)
VARIANTS = [
    ("0.1b", 768, 12, 12, 64),
    ("0.4b", 1024, 16, 8, 64),
    ("0.8b", 1280, 16, 8, 80),
    ("1b", 1536, 24, 12, 64),
    ("5b", 2432, 32, 16, 76),
]
BACKENDS = ["reference", "triton", "cuda"]


def backend_or_skip(name: str, op: str):
    """Skip (with the reason) a backend that cannot run ``op`` here."""
    from sapiens2.ops.backend import cuda_extension_available, has_impl, triton_available

    if name == "triton" and not (ON_GPU and triton_available()):
        pytest.skip("triton backend needs a GPU (the interpreter is never timed)")
    if name == "cuda" and not (ON_GPU and cuda_extension_available()):
        pytest.skip("cuda backend needs a GPU and the compiled extension")
    if not has_impl(op, name):
        pytest.skip(f"the {name} backend has no {op!r} kernel")


def tag(benchmark, **info):
    benchmark.extra_info.update({"device": torch.cuda.get_device_name(0) if ON_GPU else "cpu", **info})


def sync():
    if ON_GPU:
        torch.cuda.synchronize()
