"""RMSNorm and residual-add (+ LayerScale) + RMSNorm Triton kernels under the interpreter (CPU),
forward and every gradient vs a float64 plain-torch reference (autograd).

Tolerance rule: max-abs error vs float64 <= 2 x (max-abs error of the same plain-torch computation
run in the low precision) + 1 ulp of the output dtype at the float64 output's scale.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from plain_reference import rms_norm as ref_rms_norm  # noqa: E402
from sapiens2.kernels import rms_norm as RN  # noqa: E402
from tolerance import DTYPES, check, plain_grads  # noqa: E402

EPS = 1e-6


def data(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# rows x width: awkward (1 element, odd widths, more rows than backward programs, so a program walks
# several rows and the last one runs past M), real embedding widths, the chunked widths
RMS_CASES = [(1, 1), (3, 77), (5, 100), (70, 100), (2, 768), (2, 1024), (2, 1280), (2, 1536), (2, 2432), (40, 2432)]


def _rms_case(M, C, dtype):
    gen = torch.Generator().manual_seed(M * 131 + C)
    x, w, g = data(M, C, gen=gen), 1 + 0.1 * data(C, gen=gen), data(M, C, gen=gen)
    ex_out, ex_g = plain_grads(ref_rms_norm, [x, w], torch.float64, g)
    lo_out, lo_g = plain_grads(ref_rms_norm, [x, w], dtype, g)
    y, rstd = RN.rms_norm_fwd(x.to(dtype), w.to(dtype), EPS)
    assert rstd.dtype == torch.float32 and rstd.shape == (M,)
    ex_rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    assert torch.allclose(rstd.double(), ex_rstd, rtol=2e-2 if dtype != torch.float32 else 1e-5)
    dx, dw = RN.rms_norm_bwd(g.to(dtype), x.to(dtype), w.to(dtype), rstd)
    for name, got, e, lo in (("y", y, ex_out, lo_out), ("dx", dx, ex_g[0], lo_g[0]), ("dweight", dw, ex_g[1], lo_g[1])):
        check(name, got, e, lo, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C", RMS_CASES)
def test_rms_norm(M, C, dtype):
    _rms_case(M, C, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_9728(dtype):
    """The 5B FFN width: the chunked forward and backward, a last partial tile."""
    _rms_case(3, 9728, dtype)


def _add_case(M, C, dtype, scale, with_dh):
    gen = torch.Generator().manual_seed(M * 7 + C + 3 * scale + with_dh)
    x, r, w = data(M, C, gen=gen), data(M, C, gen=gen), 1 + 0.1 * data(C, gen=gen)
    s = 0.5 * data(C, gen=gen) if scale else None
    gy = data(M, C, gen=gen)
    gh = data(M, C, gen=gen) if with_dh else torch.zeros(M, C, dtype=torch.float64)

    def fn(x, r, w, *s_):
        h = r + (x * s_[0] if s_ else x)
        return torch.cat([ref_rms_norm(h, w), h], dim=-1)

    ins = [x, r, w] + ([s] if scale else [])
    g = torch.cat([gy, gh], dim=-1)
    ex_out, ex_g = plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = plain_grads(fn, ins, dtype, g)
    d = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y, h, rstd = RN.add_rms_norm_fwd(d(x), d(r), d(s), d(w), EPS)
    assert rstd.dtype == torch.float32 and rstd.shape == (M,)
    dx, dres, dw, ds = RN.add_rms_norm_bwd(d(gy), d(gh) if with_dh else None, d(x), h, d(s), d(w), rstd)
    check("y", y, ex_out[:, :C], lo_out[:, :C], dtype)
    check("h", h, ex_out[:, C:], lo_out[:, C:], dtype)
    check("dx", dx, ex_g[0], lo_g[0], dtype)
    check("dresidual", dres, ex_g[1], lo_g[1], dtype)
    check("dweight", dw, ex_g[2], lo_g[2], dtype)
    if scale:
        check("dx_scale", ds, ex_g[3], lo_g[3], dtype)
    else:
        assert ds is None


VARIANTS = [(True, True), (False, True), (True, False), (False, False)]  # (x_scale given, dh given)


# C = 1 only with dh: without a stream gradient dx = rstd * g * eps / (x^2 + eps) ~ 1e-8 is pure
# cancellation, so its error is rounding noise around 0 (test_rms_norm covers C = 1 under the rule)
ADD_CASES = [(M, C, s, dh) for M, C in [(1, 1), (3, 100), (37, 77), (2, 1024), (2, 2432)]
             for s, dh in VARIANTS if C > 1 or dh]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C,scale,with_dh", ADD_CASES)
def test_add_rms_norm(M, C, scale, with_dh, dtype):
    _add_case(M, C, dtype, scale, with_dh)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,with_dh", [(True, True), (False, False)], ids=lambda v: str(v))
def test_add_rms_norm_9728(dtype, scale, with_dh):
    _add_case(2, 9728, dtype, scale, with_dh)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_full_size(dtype):
    """The real shape: N = 3081 rows at the 0.4B width 1024, residual + LayerScale + dh (each
    backward program walks a block of ~97 rows, the last one partial)."""
    _add_case(3081, 1024, dtype, True, True)


def test_empty_rows_and_asserts():
    x = torch.empty(0, 64)
    y, rstd = RN.rms_norm_fwd(x, torch.ones(64), EPS)
    assert y.shape == (0, 64) and rstd.shape == (0,)
    dx, dw = RN.rms_norm_bwd(x, x, torch.ones(64), rstd)
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64))
    with pytest.raises(AssertionError):
        RN.rms_norm_fwd(torch.randn(8, 4).t(), torch.ones(8), EPS)  # not contiguous


def test_block_choice():
    """One block up to 4096 lanes forward / 2048 backward, chunked beyond (no spills on sm_90a)."""
    assert RN.fwd_config(1) == (False, 1, 4)
    assert RN.fwd_config(1024) == (False, 1024, 4)
    assert RN.fwd_config(2432) == (False, 4096, 8)
    assert RN.fwd_config(9728)[0] and RN.bwd_config(9728)[0] and RN.bwd_config(2432)[0]
    assert not RN.bwd_config(1536)[0]
