"""RMSNorm, add+RMSNorm, SwiGLU and QK-norm+RoPE kernels vs float64, forward and every gradient.

Tolerance rule: max error vs float64 <= 2 x (error of the same plain-PyTorch computation run in
the low precision) + 1 ulp of the output dtype at the output's scale.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import plain_reference as plain  # noqa: E402
from sapiens2.kernels import qk_norm_rope as QK  # noqa: E402
from sapiens2.kernels import rms_norm as RN  # noqa: E402
from sapiens2.kernels import swiglu as SW  # noqa: E402

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(name, got, exact, low, dtype):
    exact = exact.double()
    ref_err = (low.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    bound = 2 * ref_err + ULP[dtype] * max(exact.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e})"


def _plain_grads(fn, inputs, dtype, g):
    xs = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, [x for x in xs if x is not None], g.to(dtype))
    return out, grads


def _data(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------------------- RMSNorm

ROWS_WIDTHS = [(1, 1), (3, 77), (5, 100), (4, 768), (4, 1024), (3, 1280), (3, 1536), (3, 2432), (2, 9728)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C", ROWS_WIDTHS)
def test_rms_norm(M, C, dtype):
    gen = torch.Generator().manual_seed(M * 131 + C)
    x, w, g = _data(M, C, gen=gen), 1 + 0.1 * _data(C, gen=gen), _data(M, C, gen=gen)
    fn = lambda x, w: plain.rms_norm(x, w)  # noqa: E731
    ex_out, ex_g = _plain_grads(fn, [x, w], torch.float64, g)
    lo_out, lo_g = _plain_grads(fn, [x, w], dtype, g)
    y, rstd = RN.rms_norm_fwd(x.to(dtype), w.to(dtype), 1e-6)
    dx, dw = RN.rms_norm_bwd(g.to(dtype), x.to(dtype), w.to(dtype), rstd)
    for name, got, e, lo in (("y", y, ex_out, lo_out), ("dx", dx, ex_g[0], lo_g[0]), ("dw", dw, ex_g[1], lo_g[1])):
        _check(name, got, e, lo, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C", [(1, 1), (3, 100), (4, 1024), (3, 2432), (2, 9728)])
@pytest.mark.parametrize("scale,with_dh", [(True, True), (False, True), (True, False)])
def test_add_rms_norm(M, C, dtype, scale, with_dh):
    gen = torch.Generator().manual_seed(M * 7 + C)
    x, r, w = _data(M, C, gen=gen), _data(M, C, gen=gen), 1 + 0.1 * _data(C, gen=gen)
    s = _data(C, gen=gen) if scale else None
    gy, gh = _data(M, C, gen=gen), (_data(M, C, gen=gen) if with_dh else torch.zeros(M, C, dtype=torch.float64))

    def fn(x, r, w, *s_):
        h = r + (x * s_[0] if s_ else x)
        return torch.cat([plain.rms_norm(h, w), h], dim=-1)

    ins = [x, r, w] + ([s] if scale else [])
    g = torch.cat([gy, gh], dim=-1)
    ex_out, ex_g = _plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = _plain_grads(fn, ins, dtype, g)
    d = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y, h, rstd = RN.add_rms_norm_fwd(d(x), d(r), d(s), d(w), 1e-6)
    dx, dres, dw, ds = RN.add_rms_norm_bwd(d(gy), d(gh) if with_dh else None, d(x), h, d(s), d(w), rstd)
    _check("y", y, ex_out[:, :C], lo_out[:, :C], dtype)
    _check("h", h, ex_out[:, C:], lo_out[:, C:], dtype)
    _check("dx", dx, ex_g[0], lo_g[0], dtype)
    _check("dresidual", dres, ex_g[1], lo_g[1], dtype)
    _check("dw", dw, ex_g[2], lo_g[2], dtype)
    if scale:
        _check("dx_scale", ds, ex_g[3], lo_g[3], dtype)
    else:
        assert ds is None


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_full_size(dtype):
    """N = 3081 rows at the 0.4B width, residual + LayerScale, once per dtype."""
    test_add_rms_norm(3081, 1024, dtype, True, True)


# ----------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F", [(1, 1), (3, 77), (4, 3072), (2, 4 * 1280), (2, 4 * 2432)])
def test_swiglu(M, F, dtype):
    gen = torch.Generator().manual_seed(F)
    x, g = _data(M, 2 * F, gen=gen, scale=2.0), _data(M, F, gen=gen)
    ex_out, ex_g = _plain_grads(plain.swiglu, [x], torch.float64, g)
    lo_out, lo_g = _plain_grads(plain.swiglu, [x], dtype, g)
    _check("y", SW.swiglu_fwd(x.to(dtype)), ex_out, lo_out, dtype)
    _check("dx12", SW.swiglu_bwd(g.to(dtype), x.to(dtype)), ex_g[0], lo_g[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F,bias", [(1, 1, True), (37, 77, True), (300, 1024, True), (5, 3072, False)])
def test_swiglu_recompute_backward(M, F, bias, dtype):
    """The FFN backward pass: recomputed hidden s, dx12 and the w12 bias gradient (a row sum)."""
    gen = torch.Generator().manual_seed(M + F)
    x, g = _data(M, 2 * F, gen=gen, scale=2.0), _data(M, F, gen=gen)
    s, dx12, db = SW.swiglu_recompute_bwd(g.to(dtype), x.to(dtype), bias)
    ex_out, ex_g = _plain_grads(plain.swiglu, [x], torch.float64, g)
    lo_out, lo_g = _plain_grads(plain.swiglu, [x], dtype, g)
    _check("s", s, ex_out, lo_out, dtype)
    _check("dx12", dx12, ex_g[0], lo_g[0], dtype)
    if bias:
        _check("db12", db, ex_g[0].sum(0), lo_g[0].float().sum(0).to(dtype), dtype)
    else:
        assert db.numel() == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_full_size(dtype):
    test_swiglu(3081, 4096, dtype)


# ----------------------------------------------------------------------------------------------- QK-norm + RoPE


def _rope_case(B, N, HQ, HK, D, P, per_sample, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = _data(B, N, HQ, D, gen=gen), _data(B, N, HK, D, gen=gen)
    qw, kw = 1 + 0.1 * _data(D, gen=gen), 1 + 0.1 * _data(D, gen=gen)
    ang = torch.rand(*((B, N - P, D) if per_sample else (N - P, D)), generator=gen, dtype=torch.float64) * 6.28
    sin, cos = torch.sin(ang), torch.cos(ang)
    gq, gk = _data(B, N, HQ, D, gen=gen), _data(B, N, HK, D, gen=gen)

    def fn(q, k, qw, kw):
        qo = plain.rope(plain.rms_norm(q, qw), sin.to(q.dtype), cos.to(q.dtype), P)
        ko = plain.rope(plain.rms_norm(k, kw), sin.to(q.dtype), cos.to(q.dtype), P)
        return torch.cat([qo.flatten(), ko.flatten()])

    g = torch.cat([gq.flatten(), gk.flatten()])
    ex_out, ex_g = _plain_grads(fn, [q, k, qw, kw], torch.float64, g)
    lo_out, lo_g = _plain_grads(fn, [q, k, qw, kw], dtype, g)
    d = lambda t: t.to(dtype)  # noqa: E731
    qo, ko, qr, kr = QK.qk_norm_rope_fwd(d(q), d(k), d(qw), d(kw), sin.float(), cos.float(), P, 1e-6)
    dq, dk, dqw, dkw = QK.qk_norm_rope_bwd(d(gq), d(gk), d(q), d(k), d(qw), d(kw), sin.float(), cos.float(), qr, kr, P)
    nq = q.numel()
    _check("q", qo, ex_out[:nq].view_as(q), lo_out[:nq].view_as(q), dtype)
    _check("k", ko, ex_out[nq:].view_as(k), lo_out[nq:].view_as(k), dtype)
    for name, got, e, lo in zip(("dq", "dk", "dq_weight", "dk_weight"), (dq, dk, dqw, dkw), ex_g, lo_g):
        _check(name, got, e, lo, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,N,HQ,HK,D,P,per_sample",
    [(2, 13, 4, 2, 64, 9, False), (1, 12, 2, 2, 76, 0, True), (2, 10, 4, 4, 80, 1, False),
     (1, 5, 2, 1, 128, 3, True), (1, 1, 1, 1, 64, 0, False), (1, 9, 2, 2, 64, 9, False)],
)
def test_qk_norm_rope(B, N, HQ, HK, D, P, per_sample, dtype):
    _rope_case(B, N, HQ, HK, D, P, per_sample, dtype, seed=N * D + P)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rope_full_size(dtype):
    """N = 3081 tokens, 9 prefix, D = 64, a GQA pair of heads (the interpreter's budget: all heads of a
    token share one program, so more heads test nothing new)."""
    _rope_case(1, 3081, 2, 1, 64, 9, False, dtype, seed=3081)
