"""Per-op microbenchmarks, forward and forward+backward, per backend and Sapiens2 variant."""

import nvtx
import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPE, N, VARIANTS, backend_or_skip, sync, tag

import sapiens2.ops as ops


def _run(benchmark, fn, inputs, backward, backend, **info):
    tag(benchmark, backend=backend, backward=backward, **info)

    def step():
        with nvtx.annotate(f"{info.get('op')} {backend}"), ops.use_backend(backend, strict=backend != "reference"):
            out = fn(*inputs)
            if backward:
                out = out[0] if isinstance(out, tuple) else out
                out.backward(torch.ones_like(out))
        sync()

    benchmark(step)


def _t(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_rms_norm(benchmark, arch, C, H, Hkv, D, backend, backward):
    backend_or_skip(backend, "rms_norm")
    _run(benchmark, ops.rms_norm, [_t(1, N, C), _t(C)], backward, backend, op="rms_norm", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_add_rms_norm(benchmark, arch, C, H, Hkv, D, backend, backward):
    backend_or_skip(backend, "add_rms_norm")
    fn = lambda x, r, w, s: ops.rms_norm(x, w, residual=r, x_scale=s)  # noqa: E731
    _run(benchmark, fn, [_t(1, N, C), _t(1, N, C), _t(C), _t(C)], backward, backend, op="add_rms_norm", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_swiglu(benchmark, arch, C, H, Hkv, D, backend, backward):
    backend_or_skip(backend, "swiglu")
    _run(benchmark, ops.swiglu, [_t(1, N, 8 * C)], backward, backend, op="swiglu", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_qk_norm_rope(benchmark, arch, C, H, Hkv, D, backend, backward):
    backend_or_skip(backend, "qk_norm_rope")
    sin, cos = torch.rand(N - 9, D, device=DEVICE), torch.rand(N - 9, D, device=DEVICE)
    fn = lambda q, k, wq, wk: ops.qk_norm_rope(q, k, wq, wk, sin, cos, 9)  # noqa: E731
    _run(benchmark, fn, [_t(1, N, H, D), _t(1, N, Hkv, D), _t(D), _t(D)], backward, backend, op="qk_norm_rope", arch=arch)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,C,H,Hkv,D", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_attention_fused_norm_rope(benchmark, arch, C, H, Hkv, D, backend, backward):
    backend_or_skip(backend, "attention")
    sin, cos = torch.rand(N - 9, D, device=DEVICE), torch.rand(N - 9, D, device=DEVICE)
    fn = lambda q, k, v, wq, wk: ops.attention(q, k, v, q_norm_weight=wq, k_norm_weight=wk,  # noqa: E731
                                               rope=(sin, cos), num_prefix_tokens=9)
    _run(benchmark, fn, [_t(1, N, H, D), _t(1, N, Hkv, D), _t(1, N, Hkv, D), _t(D), _t(D)], backward, backend,
         op="attention", arch=arch, flops=4 * N * N * H * D)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["grid", "windows"])
def test_window_attention_tokenizer(benchmark, layout, backend, backward):
    """The 1B-4K tokenizer's windows: 4x4 tokens + CLS, 24 heads x 64 (a 64x48-window slice on CPU)."""
    backend_or_skip(backend, "window_attention")
    gh, gw = (256, 192) if DEVICE == "cuda" else (32, 24)
    H, D, w = 24, 64, 4
    nW = (gh // w) * (gw // w)
    fn = lambda q, k, v, pq, pk, pv: ops.window_attention(q, k, v, (gh, gw), w, pq, pk, pv, layout=layout)  # noqa
    _run(benchmark, fn, [_t(1, gh * gw, H, D) for _ in range(3)] + [_t(1, nW, H, D) for _ in range(3)], backward,
         backend, op="window_attention", layout=layout)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cls_pool(benchmark, backend, backward):
    backend_or_skip(backend, "cls_pool")
    gh, gw = (256, 192) if DEVICE == "cuda" else (32, 24)
    H, D, w = 24, 64, 4
    nW = (gh // w) * (gw // w)
    fn = lambda cq, ck, cv, k, v: ops.cls_pool(cq, ck, cv, k, v, (gh, gw), w)  # noqa: E731
    _run(benchmark, fn, [_t(1, nW, H, D) for _ in range(3)] + [_t(1, gh * gw, H, D) for _ in range(2)], backward,
         backend, op="cls_pool")
