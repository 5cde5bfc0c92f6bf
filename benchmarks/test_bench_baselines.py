"""Baselines on the same shapes: PyTorch eager ops and SDPA, FlexAttention (compiled), and
flash-attn / xformers / NVIDIA apex when importable (skipped with the reason when not)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPE, N, ON_GPU, VARIANTS, sync, tag


def _import_or_skip(module: str, why: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken build
        pytest.skip(f"{module} not importable ({type(e).__name__}: {e}); {why}")


def _t(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=True)


def _bench(benchmark, fn, backward, **info):
    tag(benchmark, backward=backward, **info)

    def step():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        sync()

    benchmark(step)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_torch_rms_norm(benchmark, arch, C, H, Hkv, D, backward):
    x, w = _t(1, N, C), _t(C)
    _bench(benchmark, lambda: F.rms_norm(x, (C,), w, 1e-6), backward, op="rms_norm", baseline="torch", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_torch_swiglu(benchmark, arch, C, H, Hkv, D, backward):
    x = _t(1, N, 8 * C)

    def fn():
        a, b = x.chunk(2, -1)
        return F.silu(a) * b

    _bench(benchmark, fn, backward, op="swiglu", baseline="torch", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_sdpa(benchmark, arch, C, H, Hkv, D, backward):
    q, k, v = _t(1, H, N, D), _t(1, Hkv, N, D), _t(1, Hkv, N, D)
    _bench(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), backward,
           op="attention", baseline="sdpa", arch=arch, flops=4 * N * N * H * D)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_flex_attention(benchmark, arch, C, H, Hkv, D, backward):
    if not ON_GPU:
        pytest.skip("FlexAttention is compiled for GPUs; not timed on the CPU")
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    q, k, v = _t(1, H, N, D), _t(1, Hkv, N, D), _t(1, Hkv, N, D)
    _bench(benchmark, lambda: flex(q, k, v, enable_gqa=True), backward, op="attention", baseline="flex",
           arch=arch, flops=4 * N * N * H * D)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_flash_attn(benchmark, arch, C, H, Hkv, D, backward):
    fa = _import_or_skip("flash_attn", "optional baseline: pip install flash-attn")
    if not ON_GPU:
        pytest.skip("flash-attn needs a GPU")
    # its native layout (B, N, heads, D) with the true head dim: it pads D to a multiple of 8 itself
    # (a copy, part of its time) and runs GQA without expanding K/V
    q, k, v = _t(1, N, H, D), _t(1, N, Hkv, D), _t(1, N, Hkv, D)
    _bench(benchmark, lambda: fa.flash_attn_func(q, k, v), backward, op="attention", baseline="flash-attn",
           arch=arch, flops=4 * N * N * H * D)


@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_xformers(benchmark, arch, C, H, Hkv, D):
    xops = _import_or_skip("xformers.ops", "optional baseline: pip install xformers")
    if not ON_GPU:
        pytest.skip("xformers memory-efficient attention is timed on GPUs only")
    q, k, v = _t(1, N, H, D), _t(1, N, H, D), _t(1, N, H, D)
    _bench(benchmark, lambda: xops.memory_efficient_attention(q, k, v), False, op="attention", baseline="xformers",
           arch=arch, flops=4 * N * N * H * D)


@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_apex_rms_norm(benchmark, arch, C, H, Hkv, D):
    # NVIDIA apex (not the unrelated PyPI package named "apex"): its fused RMSNorm lives here
    mod = _import_or_skip("apex.normalization", "optional baseline: build NVIDIA apex from source")
    if not ON_GPU:
        pytest.skip("NVIDIA apex kernels need a GPU")
    norm = mod.FusedRMSNorm(C, eps=1e-6).to(DEVICE, DTYPE)
    x = _t(1, N, C)
    _bench(benchmark, lambda: norm(x), True, op="rms_norm", baseline="apex", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_flex_window_attention(benchmark, backward):
    """The tokenizer's windowed attention as FlexAttention runs it: the token grid permuted into
    window order, each window's CLS prepended, and a block mask keeping attention inside windows."""
    if not ON_GPU:
        pytest.skip("FlexAttention is compiled for GPUs; not timed on the CPU")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gh, gw, w, H, D = 256, 192, 4, 24, 64
    nW, S = (gh // w) * (gw // w), 1 + w * w
    L = nW * S  # windows laid out one after another, CLS first in each

    def same_window(b, h, q_idx, kv_idx):
        return q_idx // S == kv_idx // S

    mask = create_block_mask(same_window, None, None, L, L, device=DEVICE)
    flex = torch.compile(flex_attention)
    q, k, v = _t(1, H, L, D), _t(1, H, L, D), _t(1, H, L, D)
    _bench(benchmark, lambda: flex(q, k, v, block_mask=mask), backward, op="window_attention", baseline="flex",
           flops=4 * H * L * S * D)
