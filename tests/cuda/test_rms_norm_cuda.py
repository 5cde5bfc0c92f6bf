"""The RMSNorm / add + RMSNorm CUDA kernels (csrc/kernels/rms_norm.cu) executed by the CPU
emulation: forward and every gradient through the ``sapiens2`` ops on the ``"cuda"`` backend vs a
float64 plain-torch reference under the tolerance rule; the global-memory traffic of each kernel
(every input read once, every output written once); thread-order independence; opcheck; errors."""

import pytest
import torch

from plain_reference import rms_norm as ref_rms_norm
from sapiens2 import ops
from sapiens2.cuda_tools.emu import DTYPE_CODES, Traffic
from tolerance import DTYPES, check, plain_grads

EPS = 1e-6


def data(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# rows x width: awkward (1 element, odd widths: the scalar path, more rows than the persistent
# grid so blocks walk several rows), real embedding widths, the 5B FFN width (16 elements per
# thread at 608 threads), the real token count
CASES = [(1, 1), (3, 77), (70, 100), (2, 768), (5, 1024), (2, 1280), (2, 1536), (40, 2432), (2, 9728), (3081, 1024)]


def _case(M, C, dtype, residual, scale, with_dh):
    gen = torch.Generator().manual_seed(M * 7 + C + 3 * scale + with_dh)
    x, r, w = data(M, C, gen=gen), data(M, C, gen=gen), 1 + 0.1 * data(C, gen=gen)
    s = 0.5 * data(C, gen=gen) if scale else None
    gy = data(M, C, gen=gen)
    gh = data(M, C, gen=gen) if with_dh else torch.zeros(M, C, dtype=torch.float64)

    if residual:
        def fn(x, r, w, *s_):
            h = r + (x * s_[0] if s_ else x)
            return torch.cat([ref_rms_norm(h, w, EPS), h], dim=-1)

        ins, g = [x, r, w] + ([s] if scale else []), torch.cat([gy, gh], dim=-1)
    else:
        def fn(x, w):
            return ref_rms_norm(x, w, EPS)

        ins, g = [x, w], gy
    ex_out, ex_g = plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = plain_grads(fn, ins, dtype, g)

    xs = [t.to(dtype).requires_grad_() for t in ins]
    if residual:
        y, h = ops.rms_norm(xs[0], xs[2], EPS, residual=xs[1], x_scale=xs[3] if scale else None)
        out = torch.cat([y, h], dim=-1)
        if with_dh:
            grads = torch.autograd.grad([y, h], xs, [gy.to(dtype), gh.to(dtype)])
        else:  # h unused downstream: its gradient is None, not zeros
            grads = torch.autograd.grad(y, xs, gy.to(dtype))
    else:
        out = ops.rms_norm(xs[0], xs[1], EPS)
        grads = torch.autograd.grad(out, xs, gy.to(dtype))
    check("out", out.detach(), ex_out, lo_out, dtype)
    names = ["dx", "dresidual", "dweight", "dx_scale"] if residual else ["dx", "dweight"]
    for name, got, e, lo in zip(names, grads, ex_g, lo_g):
        check(name, got, e, lo, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C", CASES)
def test_rms_norm(M, C, dtype, emulated_cuda):
    if M * C > 1e6 and dtype != torch.bfloat16:
        pytest.skip("the real shape once, in bf16")
    _case(M, C, dtype, residual=False, scale=False, with_dh=False)


VARIANTS = [(True, True), (False, True), (True, False), (False, False)]  # (x_scale given, dh given)
ADD_CASES = [(M, C, s, dh) for M, C in [(1, 1), (37, 77), (2, 1024), (2, 2432), (2, 9728)] for s, dh in VARIANTS
             if C > 1 or dh] + [(3081, 1024, True, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C,scale,with_dh", ADD_CASES)
def test_add_rms_norm(M, C, scale, with_dh, dtype, emulated_cuda):
    if M * C > 1e6 and dtype != torch.bfloat16:
        pytest.skip("the real shape once, in bf16")
    _case(M, C, dtype, residual=True, scale=scale, with_dh=with_dh)


def test_fp32_weights_with_bf16_activations(emulated_cuda):
    """Mixed precision keeps fp32 parameters: the kernels read them as they are."""
    gen = torch.Generator().manual_seed(0)
    x, w = data(9, 1024, gen=gen).bfloat16(), (1 + 0.1 * data(1024, gen=gen)).float()
    y = ops.rms_norm(x, w, EPS)
    exact = ref_rms_norm(x.double(), w.double(), EPS)
    assert y.dtype == torch.bfloat16
    assert (y.double() - exact).abs().max() <= 2.0**-7 * exact.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [77, 1024])
def test_traffic_each_byte_once(C, dtype, emu_lib, schedule):
    """Global-memory traffic counted by the emulator, byte by byte: every activation input read
    exactly once, every output written exactly once (the parameter vectors, C elements, are re-read
    per row from L1/L2 and not counted here), and nothing touched outside the tensors."""
    M, programs = 19, 4
    code = DTYPE_CODES[dtype]
    x, r, dy, dh = (torch.randn(M, C).to(dtype) for _ in range(4))
    w, s = torch.randn(C).to(dtype), torch.randn(C).to(dtype)
    y, h = torch.empty(M, C, dtype=dtype), torch.empty(M, C, dtype=dtype)
    rstd = torch.empty(M)
    with Traffic(emu_lib, x=x, r=r, w=w, s=s, y=y, h=h, rstd=rstd) as t:
        emu_lib.call("s2_rms_norm_fwd", code, code, x, r, s, w, y, h, rstd, M, C, EPS, programs, None, int_args=(0, 1, 12))
    assert t.untracked == (0, 0)
    for name in ("x", "r"):
        assert t[name].reads_each_byte == (1, 1) and t[name].write_bytes == 0, name
    for name in ("y", "h", "rstd"):
        assert t[name].writes_each_byte == (1, 1) and t[name].read_bytes == 0, name

    dx, dres = torch.empty(M, C, dtype=dtype), torch.empty(M, C, dtype=dtype)
    dw_part, ds_part = torch.empty(programs, C), torch.empty(programs, C)
    with Traffic(emu_lib, dy=dy, dh=dh, x=x, h=h, w=w, s=s, rstd=rstd, dx=dx, dres=dres, dw_part=dw_part,
                 ds_part=ds_part) as t:
        emu_lib.call("s2_rms_norm_bwd", code, code, dy, dh, x, h, s, w, rstd, dx, dres, dw_part, ds_part, M, C, programs,
                     None, int_args=(0, 1, 15))
    assert t.untracked == (0, 0)
    for name in ("dy", "dh", "x", "h", "rstd"):
        assert t[name].reads_each_byte == (1, 1) and t[name].write_bytes == 0, name
    for name in ("dx", "dres", "dw_part", "ds_part"):
        assert t[name].writes_each_byte == (1, 1) and t[name].read_bytes == 0, name


def test_thread_order_does_not_change_results(emu_lib):
    """The same launch with the block's threads resumed in reverse order gives identical bits."""
    M, C, code = 11, 2432, DTYPE_CODES[torch.bfloat16]
    x, w = torch.randn(M, C).bfloat16(), torch.randn(C).bfloat16()
    outs = []
    for rev in (False, True):
        emu_lib.set_reverse(rev)
        y, rstd = torch.empty_like(x), torch.empty(M)
        emu_lib.call("s2_rms_norm_fwd", code, code, x, None, None, w, y, None, rstd, M, C, EPS, 3, None,
                     int_args=(0, 1, 12))
        outs.append((y, rstd))
    emu_lib.set_reverse(False)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_opcheck(emulated_cuda):
    x, r = torch.randn(3, 5, 256), torch.randn(3, 5, 256)
    w, s = torch.randn(256), torch.randn(256)
    torch.library.opcheck(torch.ops.sapiens2.rms_norm, (x, w, EPS))
    torch.library.opcheck(torch.ops.sapiens2.add_rms_norm, (x, r, s, w, EPS))
    torch.library.opcheck(torch.ops.sapiens2.add_rms_norm, (x.bfloat16(), r.bfloat16(), None, w.bfloat16(), EPS))
    E = torch.ops.sapiens2_emu
    y, rstd = E.rms_norm_fwd(x, w, EPS)
    torch.library.opcheck(E.rms_norm_fwd, (x, w, EPS))
    torch.library.opcheck(E.rms_norm_bwd, (torch.randn_like(x), x, w, rstd))
    _, h, rstd = E.add_rms_norm_fwd(x, r, s, w, EPS)
    torch.library.opcheck(E.add_rms_norm_bwd, (torch.randn_like(x), torch.randn_like(x), x, h, s, w, rstd))


def test_binding_errors_name_the_argument(_emu_ext):
    E = torch.ops.sapiens2_emu
    x, w = torch.randn(4, 64), torch.randn(64)
    with pytest.raises(ValueError, match="x must be contiguous"):
        E.rms_norm_fwd(torch.randn(64, 4).t(), torch.randn(4), EPS)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        E.rms_norm_fwd(x.double(), w.double(), EPS)
    with pytest.raises(ValueError, match=r"weight must have shape \(64\)"):
        E.rms_norm_fwd(x, torch.randn(63), EPS)
    with pytest.raises(TypeError, match="residual has dtype"):
        E.add_rms_norm_fwd(x, x.bfloat16(), None, w, EPS)
    with pytest.raises(ValueError, match="exceed the CUDA kernel's limit"):
        E.rms_norm_fwd(torch.randn(1, 12296), torch.randn(12296), EPS)  # vectorised rows: up to 12288
    with pytest.raises(ValueError, match="exceed the CUDA kernel's limit"):
        E.rms_norm_fwd(torch.randn(1, 4097), torch.randn(4097), EPS)  # scalar rows (odd widths): up to 4096
    with pytest.raises(ValueError, match="rstd must hold one value per row"):
        E.rms_norm_bwd(x, x, w, torch.randn(3))


def test_empty_rows_give_zero_weight_gradient(emulated_cuda):
    x = torch.empty(0, 64)
    y, rstd = torch.ops.sapiens2_emu.rms_norm_fwd(x, torch.ones(64), EPS)
    assert y.shape == (0, 64) and rstd.shape == (0,)
    dx, dw = torch.ops.sapiens2_emu.rms_norm_bwd(x, x, torch.ones(64), rstd)
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64))
