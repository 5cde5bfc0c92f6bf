"""SwiGLU Triton kernels under the interpreter (CPU) vs a float64 plain-torch reference (autograd):
``swiglu_fwd`` / ``swiglu_bwd`` and the fused FFN backward pass ``swiglu_recompute_bwd``.

Tolerance rule: max-abs error vs float64 <= 2 x (max-abs error of the same plain-torch computation
run in the low precision) + 1 ulp of the output dtype at the float64 output's scale.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from plain_reference import swiglu as ref_swiglu  # noqa: E402
from sapiens2.kernels import swiglu as SW  # noqa: E402
from tolerance import DTYPES, check, plain_grads  # noqa: E402



def _case(M, F, dtype):
    gen = torch.Generator().manual_seed(M * 17 + F)
    x = torch.randn(M, 2 * F, generator=gen, dtype=torch.float64) * 2.0
    g = torch.randn(M, F, generator=gen, dtype=torch.float64)
    ex_out, (ex_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    lo_out, (lo_dx,) = plain_grads(ref_swiglu, [x], dtype, g)
    check("y", SW.swiglu_fwd(x.to(dtype)), ex_out, lo_out, dtype)
    check("dx12", SW.swiglu_bwd(g.to(dtype), x.to(dtype)), ex_dx, lo_dx, dtype)


# FFN hidden F = 4C at the real widths (768 .. 2432 -> 3072 .. 9728), awkward sizes (one element,
# odd F: masked column tiles and a row split that is not tile aligned)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F", [(1, 1), (3, 77), (2, 1000), (2, 4 * 768), (1, 4 * 1024), (1, 4 * 1280),
                                 (1, 4 * 1536), (1, 4 * 2432)])
def test_swiglu(M, F, dtype):
    _case(M, F, dtype)


@pytest.mark.slow
def test_swiglu_full_width():
    """The real shape: N = 3081 rows at the 0.4B FFN width F = 4096, once, in bf16 (the training dtype;
    as the CUDA tests do): under the interpreter each dtype costs minutes, and fp32/fp16 take the same
    code path, covered with tails by test_swiglu's grid."""
    _case(3081, 4096, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F,bias", [(1, 1, True), (37, 77, True), (100, 1024, True), (3, 3072, False)])
def test_swiglu_recompute_backward(M, F, bias, dtype):
    """The FFN backward pass: recomputed hidden s, dx12 and the w12 bias gradient (a row sum)."""
    gen = torch.Generator().manual_seed(M + F)
    x = torch.randn(M, 2 * F, generator=gen, dtype=torch.float64) * 2.0
    g = torch.randn(M, F, generator=gen, dtype=torch.float64)
    s, dx12, db = SW.swiglu_recompute_bwd(g.to(dtype), x.to(dtype), bias)
    ex_out, (ex_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    lo_out, (lo_dx,) = plain_grads(ref_swiglu, [x], dtype, g)
    check("s", s, ex_out, lo_out, dtype)
    check("dx12", dx12, ex_dx, lo_dx, dtype)
    if bias:
        check("db12", db, ex_dx.sum(0), lo_dx.float().sum(0).to(dtype), dtype)
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F", [(1, 1), (37, 77), (100, 1024)])
def test_swiglu_bias_backward(M, F, dtype):
    """dx12 and the w12 bias gradient without the recomputed s (the caller kept it)."""
    gen = torch.Generator().manual_seed(M + F + 1)
    x = torch.randn(M, 2 * F, generator=gen, dtype=torch.float64) * 2.0
    g = torch.randn(M, F, generator=gen, dtype=torch.float64)
    dx12, db = SW.swiglu_bias_bwd(g.to(dtype), x.to(dtype))
    _, (ex_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    _, (lo_dx,) = plain_grads(ref_swiglu, [x], dtype, g)
    check("dx12", dx12, ex_dx, lo_dx, dtype)
    check("db12", db, ex_dx.sum(0), lo_dx.float().sum(0).to(dtype), dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ffn_keep_hidden_equals_recompute(backend):
    """swiglu_ffn(keep_hidden=True) keeps s instead of recomputing it: same values, same gradients."""
    from sapiens2 import ops

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 64, generator=gen)
    w12, b12 = torch.randn(256, 64, generator=gen) * 0.1, torch.randn(256, generator=gen)
    w3, b3 = torch.randn(64, 128, generator=gen) * 0.1, torch.randn(64, generator=gen)
    dy = torch.randn(2, 9, 64, generator=gen)
    results = []
    for keep in (False, True):
        ins = [t.clone().requires_grad_() for t in (x, w12, b12, w3, b3)]
        with ops.use_backend(backend, strict=backend != "reference"):
            y = ops.swiglu_ffn(*ins, keep_hidden=keep)
            results.append((y.detach(), torch.autograd.grad(y, ins, dy)))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0) if backend == "reference" else \
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with ops.use_backend(backend, strict=backend != "reference"):
        torch.library.opcheck(torch.ops.sapiens2.swiglu_bias_backward, (dy.repeat(1, 1, 2), x.repeat(1, 1, 4)))


def test_empty():
    assert SW.swiglu_fwd(torch.empty(0, 8)).shape == (0, 4)
    assert SW.swiglu_bwd(torch.empty(0, 4), torch.empty(0, 8)).shape == (0, 8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("keep", [False, True])
def test_ffn_second_rows_equal_separate_calls(backend, keep):
    """swiglu_ffn(x, ..., x_b=x_b): the same outputs and gradients as two calls, weight gradients
    accumulated into one GEMM's output."""
    from sapiens2 import ops

    gen = torch.Generator().manual_seed(4)
    x, xb = torch.randn(2, 9, 64, generator=gen, dtype=torch.float64), torch.randn(2, 3, 64, generator=gen,
                                                                                 dtype=torch.float64)
    w12, b12 = torch.randn(256, 64, generator=gen, dtype=torch.float64) * 0.1, torch.randn(256, generator=gen,
                                                                                         dtype=torch.float64)
    w3, b3 = torch.randn(64, 128, generator=gen, dtype=torch.float64) * 0.1, torch.randn(64, generator=gen,
                                                                                       dtype=torch.float64)
    dy, dyb = torch.randn(2, 9, 64, generator=gen, dtype=torch.float64), torch.randn(2, 3, 64, generator=gen,
                                                                                   dtype=torch.float64)
    dt = torch.float64 if backend == "reference" else torch.float32
    out = []
    for paired in (True, False):
        ins = [t.to(dt).requires_grad_() for t in (x, xb, w12, b12, w3, b3)]
        with ops.use_backend(backend, strict=backend != "reference"):
            if paired:
                y, yb = ops.swiglu_ffn(ins[0], *ins[2:], keep_hidden=keep, x_b=ins[1])
            else:
                y, yb = (ops.swiglu_ffn(ins[j], *ins[2:], keep_hidden=keep) for j in (0, 1))
            out.append(((y.detach(), yb.detach()), torch.autograd.grad((y, yb), ins, (dy.to(dt), dyb.to(dt)))))
    tol = dict(rtol=1e-10, atol=1e-10) if dt == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][0] + out[0][1], out[1][0] + out[1][1]):
        torch.testing.assert_close(a, b, **tol)
