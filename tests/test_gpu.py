"""Compiled kernels at the real Sapiens2 shapes in bf16 on a GPU (skipped without one).

Each case runs an op forward + backward on the Triton backend (and the CUDA one when built) and
on the reference backend in float64, with the tolerance rule: error vs float64 <= 2 x (error of
the reference run in bf16) + 1 bf16 ulp of the output's scale.
"""

import pytest
import torch

import sapiens2.ops as ops
from sapiens2.ops.backend import cuda_extension_available

pytestmark = pytest.mark.gpu
# the hand-written CUDA kernels too when the extension is built (they cover these ops)
BACKENDS = ("triton", "cuda") if cuda_extension_available() else ("triton",)
N = 3081  # 1 CLS + 8 registers + 3072 patches
WIDTHS = [768, 1024, 1280, 1536, 2432]


def _run(fn, inputs, backend, dtype):
    xs = [t.detach().to(dtype).requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs]
    with ops.use_backend(backend, strict=backend != "reference"):
        out = fn(*xs)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, (tuple, list)) else out.flatten()
        g = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(0), device=out.device).to(out.dtype)
        grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], g)
    return [out.double()] + [gr.double() for gr in grads]


def _check(fn, inputs, backends=BACKENDS):
    exact = _run(fn, inputs, "reference", torch.float64)
    low = _run(fn, inputs, "reference", torch.bfloat16)
    for backend in backends:
        got = _run(fn, inputs, backend, torch.bfloat16)
        for e, l_, g in zip(exact, low, got):
            ref_err = (l_ - e).abs().max().item()
            err = (g - e).abs().max().item()
            assert err <= 2 * ref_err + 2**-7 * e.abs().max().item(), (backend, err, ref_err)


def _leaf(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("C", WIDTHS)
def test_rms_norm_real_shapes(C):
    _check(lambda x, w: ops.rms_norm(x, w), [_leaf(2, N, C), _leaf(C)])
    _check(lambda x, r, w, s: ops.rms_norm(x, w, residual=r, x_scale=s), [_leaf(2, N, C), _leaf(2, N, C), _leaf(C), _leaf(C)])


@pytest.mark.parametrize("C", WIDTHS)
def test_swiglu_real_shapes(C):
    _check(ops.swiglu, [_leaf(2, N, 8 * C)])


@pytest.mark.parametrize("H,D", [(16, 64), (16, 80), (32, 76), (24, 64)])
def test_qk_norm_rope_real_shapes(H, D):
    ang = torch.rand(N - 9, D, device="cuda", dtype=torch.float64) * 6.28
    sin, cos = torch.sin(ang).float(), torch.cos(ang).float()
    _check(lambda q, k, wq, wk: ops.qk_norm_rope(q, k, wq, wk, sin, cos, 9),
           [_leaf(2, N, H, D), _leaf(2, N, H // 2, D), _leaf(D), _leaf(D)])


def test_model_triton_matches_reference():
    from sapiens2 import Sapiens2Backbone

    torch.manual_seed(0)
    model = Sapiens2Backbone("sapiens2_0.4b", rope_dtype="fp32", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 3, 1024, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with ops.use_backend("reference"):
            ref = model.double()(x.double()).float()
        model.to(torch.bfloat16)
        with ops.use_backend("triton"):
            out = model(x).float()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


# the 4K tokenizer: 1B heads (24 x 64), 4 x 4 windows, a 64 x 48 slice of the 256 x 192 patch grid
TOK_H, TOK_D, GH, GW, WIN = 24, 64, 64, 48, 4


@pytest.mark.parametrize("layout", ["grid", "windows"])
def test_window_attention_real_shapes(layout):
    L, nW = GH * GW, (GH // WIN) * (GW // WIN)
    _check(lambda q, k, v, pq, pk, pv: ops.window_attention(q, k, v, (GH, GW), WIN, pq, pk, pv, layout=layout),
           [_leaf(1, L, TOK_H, TOK_D) for _ in range(3)] + [_leaf(1, nW, TOK_H, TOK_D) for _ in range(3)])


def test_cls_pool_real_shapes():
    L, nW = GH * GW, (GH // WIN) * (GW // WIN)
    _check(lambda cq, ck, cv, k, v: ops.cls_pool(cq, ck, cv, k, v, (GH, GW), WIN),
           [_leaf(1, nW, TOK_H, TOK_D) for _ in range(3)] + [_leaf(1, L, TOK_H, TOK_D) for _ in range(2)])


def test_packed_tokenizer_ops_real_shapes():
    """Packed q/k/v (strided reads, packed gradients) and the projected form with its fused bias gradient."""
    L, nW, C = GH * GW, (GH // WIN) * (GW // WIN), TOK_H * TOK_D
    _check(lambda qkv, pqkv: ops.window_attention_qkv(qkv, (GH, GW), WIN, prefix_qkv=pqkv),
           [_leaf(1, L, 3, TOK_H, TOK_D), _leaf(1, nW, 3, TOK_H, TOK_D)])
    _check(lambda x, px, w, b: ops.window_attention_projected(x, w, b, TOK_H, (GH, GW), WIN, prefix_x=px),
           [_leaf(1, L, C), _leaf(1, nW, C), _leaf(3 * C, C), _leaf(3 * C)])
    _check(lambda cqkv, kv: ops.cls_pool_kv(cqkv, kv, (GH, GW), WIN),
           [_leaf(1, nW, 3, TOK_H, TOK_D), _leaf(1, L, 2, TOK_H, TOK_D)])


def test_swiglu_ffn_real_shape():
    C = 1024
    _check(lambda x, w12, b12, w3, b3: ops.swiglu_ffn(x, w12, b12, w3, b3),
           [_leaf(2, N, C), _leaf(8 * C, C), _leaf(8 * C), _leaf(C, 4 * C), _leaf(C)])


def test_4k_model_uses_kernels_and_matches_reference():
    """The 1B-4K model at a reduced 1024 x 768 input (tokenizer + trunk) on the default ('auto')
    backend vs the reference backend."""
    from sapiens2 import Sapiens2Backbone

    torch.manual_seed(0)
    model = Sapiens2Backbone("sapiens2_0.4b", img_size=(1024, 768), use_tokenizer=True, rope_dtype="fp32",
                             device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 3, 1024, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with ops.use_backend("reference"):
            ref = model.double()(x.double()).float()
        model.to(torch.bfloat16)
        out = model(x).float()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
