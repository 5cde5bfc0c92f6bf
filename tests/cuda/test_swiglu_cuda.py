"""The SwiGLU CUDA kernels (csrc/kernels/swiglu.cu) executed by the CPU emulation: forward, gradient
and the FFN backward pass (recomputed hidden, dx12, bias gradient; or, with the hidden kept, dx12 and
the bias gradient only) through the ``sapiens2`` ops on the ``"cuda"`` backend vs a float64 plain-torch reference under the tolerance rule; the
global-memory traffic of each kernel (every input read once, every output written once);
thread-order independence; opcheck; errors."""

import pytest
import torch
import torch.nn.functional as F

from plain_reference import swiglu as ref_swiglu
from sapiens2 import ops
from sapiens2.cuda_tools.emu import DTYPE_CODES, Traffic
from tolerance import DTYPES, check, plain_grads


def data(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def misaligned(t):
    """A contiguous copy of ``t`` one element past a 16-byte boundary (the kernels' scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


# (leading dims, F): one element, odd F (scalar path, all-masked column tail), F = 100 (a multiple
# of the fp32 vector, not of the 16-bit one), a batched (B, N, 2F) input, the FFN widths F = 4C of
# every model (768 .. 2432 -> 3072 .. 9728; 9728 = 5 column tiles), the real token count
CASES = [((1,), 1), ((3,), 77), ((70,), 100), ((2, 5), 48), ((2,), 1000), ((2,), 4 * 768), ((1,), 4 * 1024),
         ((1,), 4 * 1280), ((1,), 4 * 1536), ((2,), 4 * 2432), ((3081,), 4 * 1024)]


def _is_real(lead, F):
    return lead[0] * F > 1e6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,F", CASES)
def test_swiglu(lead, F, dtype, emulated_cuda):
    if _is_real(lead, F) and dtype != torch.bfloat16:
        pytest.skip("the real shape once, in bf16")
    gen = torch.Generator().manual_seed(sum(lead) * 17 + F)
    x, g = data(*lead, 2 * F, gen=gen, scale=2.0), data(*lead, F, gen=gen)
    ex_out, (ex_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    lo_out, (lo_dx,) = plain_grads(ref_swiglu, [x], dtype, g)
    xs = x.to(dtype).requires_grad_()
    y = ops.swiglu(xs)
    (dx,) = torch.autograd.grad(y, xs, g.to(dtype))
    check("y", y.detach(), ex_out, lo_out, dtype)
    check("dx12", dx, ex_dx, lo_dx, dtype)


def _recompute_case(x, g, bias, dtype, place=lambda t: t):
    s, dx12, db = torch.ops.sapiens2.swiglu_recompute_backward(place(g.to(dtype)), place(x.to(dtype)), bias)
    ex_out, (ex_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    lo_out, (lo_dx,) = plain_grads(ref_swiglu, [x], dtype, g)
    check("s", s, ex_out, lo_out, dtype)
    check("dx12", dx12, ex_dx, lo_dx, dtype)
    if bias:
        rows = ex_dx.reshape(-1, ex_dx.shape[-1])
        check("db12", db, rows.sum(0), lo_dx.reshape(rows.shape).float().sum(0).to(dtype), dtype)
    else:
        assert db.numel() == 0


# rows x F: more rows than the bias-gradient row blocks (each block sums several rows), odd F,
# no bias gradient, a batched input, the real shape
RECOMPUTE_CASES = [((1,), 1, True), ((37,), 77, True), ((100,), 1024, True), ((3,), 3072, False),
                   ((4, 9), 40, True), ((3081,), 4096, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,F,bias", RECOMPUTE_CASES)
def test_swiglu_recompute_backward(lead, F, bias, dtype, emulated_cuda):
    """The FFN backward pass: recomputed hidden s, dx12 and the w12 bias gradient (a row sum)."""
    if _is_real(lead, F) and dtype != torch.bfloat16:
        pytest.skip("the real shape once, in bf16")
    gen = torch.Generator().manual_seed(sum(lead) + F)
    x, g = data(*lead, 2 * F, gen=gen, scale=2.0), data(*lead, F, gen=gen)
    _recompute_case(x, g, bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,F", [((1,), 1), ((37,), 77), ((100,), 1024), ((4, 9), 40)])
def test_swiglu_bias_backward(lead, F, dtype, emulated_cuda):
    """sapiens2::swiglu_bias_backward (dx12 and the w12 bias gradient, no s written) on the CUDA
    kernel: vs float64 under the tolerance rule, vs the reference backend (the rule's low-precision
    computation) and bit-identical to swiglu_recompute_backward's dx12 and db12."""
    from sapiens2.ops import use_backend

    gen = torch.Generator().manual_seed(sum(lead) * 3 + F)
    x, g = data(*lead, 2 * F, gen=gen, scale=2.0), data(*lead, F, gen=gen)
    ds, x12 = g.to(dtype), x.to(dtype)
    dx12, db = torch.ops.sapiens2.swiglu_bias_backward(ds, x12)
    with use_backend("reference"):
        lo_dx, lo_db = torch.ops.sapiens2.swiglu_bias_backward(ds, x12)
        ex_dx, ex_db = torch.ops.sapiens2.swiglu_bias_backward(g, x)
    _, (pl_dx,) = plain_grads(ref_swiglu, [x], torch.float64, g)
    torch.testing.assert_close(ex_dx, pl_dx, rtol=1e-12, atol=1e-12)  # the float64 references agree
    check("dx12", dx12, ex_dx, lo_dx, dtype)
    check("db12", db, ex_db, lo_db, dtype)
    _, rdx, rdb = torch.ops.sapiens2.swiglu_recompute_backward(ds, x12, True)
    assert torch.equal(dx12, rdx) and torch.equal(db, rdb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_inputs(dtype, emulated_cuda):
    """Tensors not on a 16-byte boundary take the one-element path, with the same results."""
    gen = torch.Generator().manual_seed(3)
    x, g = data(9, 2 * 1024, gen=gen, scale=2.0), data(9, 1024, gen=gen)
    assert misaligned(x.to(dtype)).data_ptr() % 16 != 0
    _recompute_case(x, g, True, dtype, place=misaligned)


@pytest.mark.parametrize("keep_hidden", [False, True], ids=["recompute", "keep_hidden"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_ffn_gradients(dtype, keep_hidden, emulated_cuda):
    """The whole FFN (its backward runs swiglu_recompute_backward, or with keep_hidden the kept s and
    swiglu_bias_backward): output and all five gradients."""
    gen = torch.Generator().manual_seed(11)
    C, Fh = 32, 48
    ins = [data(2, 7, C, gen=gen), data(2 * Fh, C, gen=gen, scale=0.2), data(2 * Fh, gen=gen, scale=0.1),
           data(C, Fh, gen=gen, scale=0.2), data(C, gen=gen, scale=0.1)]
    g = data(2, 7, C, gen=gen)

    def fn(x, w12, b12, w3, b3):
        return F.linear(ref_swiglu(F.linear(x, w12, b12)), w3, b3)

    ex_out, ex_g = plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = plain_grads(fn, ins, dtype, g)
    xs = [t.to(dtype).requires_grad_() for t in ins]
    out = ops.swiglu_ffn(*xs, keep_hidden=keep_hidden)
    grads = torch.autograd.grad(out, xs, g.to(dtype))
    check("out", out.detach(), ex_out, lo_out, dtype)
    for name, got, e, lo in zip(["dx", "dw12", "db12", "dw3", "db3"], grads, ex_g, lo_g):
        check(name, got, e, lo, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F", [77, 1024])
def test_traffic_each_byte_once(F, dtype, emu_lib, schedule):
    """Global-memory traffic counted by the emulator, byte by byte: every input read exactly once,
    every output written exactly once, nothing touched outside the tensors."""
    M, programs = 19, 4
    code = DTYPE_CODES[dtype]
    x12, g = torch.randn(M, 2 * F).to(dtype), torch.randn(M, F).to(dtype)
    y, dx12 = torch.empty(M, F, dtype=dtype), torch.empty(M, 2 * F, dtype=dtype)

    def assert_once(t, inputs, outputs):
        assert t.untracked == (0, 0)
        for name in inputs:
            assert t[name].reads_each_byte == (1, 1) and t[name].write_bytes == 0, name
        for name in outputs:
            assert t[name].writes_each_byte == (1, 1) and t[name].read_bytes == 0, name

    with Traffic(emu_lib, x12=x12, y=y) as t:
        emu_lib.call("s2_swiglu_fwd", code, x12, y, M, F, None, int_args=(0,))
    assert_once(t, ["x12"], ["y"])
    with Traffic(emu_lib, dy=g, x12=x12, dx12=dx12) as t:
        emu_lib.call("s2_swiglu_bwd", code, g, x12, dx12, M, F, None, int_args=(0,))
    assert_once(t, ["dy", "x12"], ["dx12"])
    part = torch.empty(programs, 2 * F)
    with Traffic(emu_lib, ds=g, x12=x12, s=y, dx12=dx12, part=part) as t:
        emu_lib.call("s2_swiglu_recompute_bwd", code, g, x12, y, dx12, part, M, F, programs, None, int_args=(0, 8))
    assert_once(t, ["ds", "x12"], ["s", "dx12", "part"])
    dx12_b, part_b = torch.empty_like(dx12), torch.empty_like(part)
    with Traffic(emu_lib, ds=g, x12=x12, dx12=dx12_b, part=part_b) as t:  # s NULL: the bias backward
        emu_lib.call("s2_swiglu_recompute_bwd", code, g, x12, None, dx12_b, part_b, M, F, programs, None,
                     int_args=(0, 8))
    assert_once(t, ["ds", "x12"], ["dx12", "part"])
    assert torch.equal(dx12_b, dx12) and torch.equal(part_b, part)


def test_thread_order_does_not_change_results(emu_lib):
    """The FFN backward pass with the block's threads resumed in reverse order gives identical bits,
    bias partial sums included."""
    M, F, programs, code = 23, 1000, 5, DTYPE_CODES[torch.bfloat16]
    x12, ds = torch.randn(M, 2 * F).bfloat16(), torch.randn(M, F).bfloat16()
    outs = []
    for rev in (False, True):
        emu_lib.set_reverse(rev)
        s, dx12, part = torch.empty(M, F).bfloat16(), torch.empty(M, 2 * F).bfloat16(), torch.empty(programs, 2 * F)
        emu_lib.call("s2_swiglu_recompute_bwd", code, ds, x12, s, dx12, part, M, F, programs, None, int_args=(0, 8))
        dx12_b, part_b = torch.empty_like(dx12), torch.empty_like(part)  # s NULL: the bias backward
        emu_lib.call("s2_swiglu_recompute_bwd", code, ds, x12, None, dx12_b, part_b, M, F, programs, None,
                     int_args=(0, 8))
        outs.append((s, dx12, part, dx12_b, part_b))
    emu_lib.set_reverse(False)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_opcheck(emulated_cuda):
    x12, g = torch.randn(3, 5, 2 * 40), torch.randn(3, 5, 40)
    torch.library.opcheck(torch.ops.sapiens2.swiglu, (x12,))
    torch.library.opcheck(torch.ops.sapiens2.swiglu, (x12.bfloat16(),))
    torch.library.opcheck(torch.ops.sapiens2.swiglu_backward, (g, x12))
    torch.library.opcheck(torch.ops.sapiens2.swiglu_recompute_backward, (g, x12, True))
    torch.library.opcheck(torch.ops.sapiens2.swiglu_recompute_backward, (g.half(), x12.half(), False))
    E = torch.ops.sapiens2_emu
    torch.library.opcheck(E.swiglu_fwd, (x12,))
    torch.library.opcheck(E.swiglu_bwd, (g, x12))
    torch.library.opcheck(E.swiglu_recompute_bwd, (g, x12, True))
    torch.library.opcheck(E.swiglu_recompute_bwd, (g, x12, False))
    torch.library.opcheck(torch.ops.sapiens2.swiglu_bias_backward, (g, x12))
    torch.library.opcheck(torch.ops.sapiens2.swiglu_bias_backward, (g.bfloat16(), x12.bfloat16()))
    torch.library.opcheck(E.swiglu_bias_bwd, (g, x12))


def test_binding_errors_name_the_argument(_emu_ext):
    E = torch.ops.sapiens2_emu
    x12, g = torch.randn(4, 64), torch.randn(4, 32)
    with pytest.raises(ValueError, match="x12 must be contiguous"):
        E.swiglu_fwd(torch.randn(64, 4).t())
    with pytest.raises(TypeError, match="x12 must be float32, float16 or bfloat16"):
        E.swiglu_fwd(x12.double())
    with pytest.raises(ValueError, match="x12 must have an even, non-zero last dimension"):
        E.swiglu_fwd(torch.randn(4, 63))
    with pytest.raises(ValueError, match=r"dy must have shape \[4, 32\]"):
        E.swiglu_bwd(torch.randn(4, 64), x12)
    with pytest.raises(TypeError, match="dy has dtype"):
        E.swiglu_bwd(g.bfloat16(), x12)
    with pytest.raises(ValueError, match="ds must be contiguous"):
        E.swiglu_recompute_bwd(torch.randn(32, 4).t(), x12, True)
    with pytest.raises(ValueError, match=r"ds must have shape \[4, 32\]"):
        E.swiglu_bias_bwd(torch.randn(4, 64), x12)


def test_empty_rows(emulated_cuda):
    E = torch.ops.sapiens2_emu
    x12 = torch.empty(0, 8)
    assert E.swiglu_fwd(x12).shape == (0, 4)
    assert E.swiglu_bwd(torch.empty(0, 4), x12).shape == (0, 8)
    s, dx12, db = E.swiglu_recompute_bwd(torch.empty(0, 4), x12, True)
    assert s.shape == (0, 4) and dx12.shape == (0, 8) and torch.equal(db, torch.zeros(8))
    dx12, db = E.swiglu_bias_bwd(torch.empty(0, 4), x12)
    assert dx12.shape == (0, 8) and torch.equal(db, torch.zeros(8))
