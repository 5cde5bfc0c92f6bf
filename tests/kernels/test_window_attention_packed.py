"""Window attention / cls_pool on packed projections (``sapiens2.ops.window_attention_qkv``,
``cls_pool_kv``): the Triton kernels read q/k/v through row strides and write the packed gradient
slot by slot. Checked under the interpreter against float64 plain-torch references (the tolerance
rule), against the unpacked ops, with opcheck, and for the absence of hidden copies."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from plain_reference import window_attention as ref_window_attention  # noqa: E402
from sapiens2 import ops  # noqa: E402
from sapiens2.ops.backend import use_backend  # noqa: E402
from tolerance import DTYPES, check  # noqa: E402


def _inputs(B, gh, gw, w, H, D, prefix, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, nW = gh * gw, (gh // w) * (gw // w)
    qkv = torch.randn(B, L, 3 * H * D, generator=g, dtype=torch.float64).view(B, L, 3, H, D)
    pqkv = torch.randn(B, nW, 3 * H * D, generator=g, dtype=torch.float64).view(B, nW, 3, H, D) if prefix else None
    return qkv, pqkv


def _run(qkv, pqkv, gh, gw, w, do, dpo, backend):
    qkv = qkv.detach().requires_grad_()
    pqkv = pqkv.detach().requires_grad_() if pqkv is not None else None
    with use_backend(backend, strict=backend != "reference"):  # the backward too runs on `backend`
        out = ops.window_attention_qkv(qkv, (gh, gw), w, prefix_qkv=pqkv)
        outs = out if pqkv is not None else (out,)
        grads_out = (do, dpo) if pqkv is not None else (do,)
        ins = [qkv] + ([pqkv] if pqkv is not None else [])
        grads = torch.autograd.grad(outs, ins, grads_out)
    return [o.detach() for o in outs], grads


def _plain(qkv, pqkv, gh, gw, w, do, dpo):
    qkv = qkv.detach().requires_grad_()
    pqkv = pqkv.detach().requires_grad_() if pqkv is not None else None
    pre = pqkv.unbind(2) if pqkv is not None else (None, None, None)
    out = ref_window_attention(*qkv.unbind(2), gh, gw, w, *pre)
    outs = out if pqkv is not None else (out,)
    ins = [qkv] + ([pqkv] if pqkv is not None else [])
    return [o.detach() for o in outs], torch.autograd.grad(outs, ins, (do, dpo) if pqkv is not None else (do,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gh,gw,w,H,D,prefix", [(8, 12, 4, 2, 64, True), (4, 4, 2, 3, 76, True),
                                                (8, 8, 4, 2, 80, False), (8, 8, 8, 1, 64, True)])
def test_packed_window_attention_matches_float64(gh, gw, w, H, D, prefix, dtype):
    B = 2
    qkv, pqkv = _inputs(B, gh, gw, w, H, D, prefix, dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, gh * gw, H, D, generator=g, dtype=torch.float64)
    dpo = torch.randn(B, (gh // w) * (gw // w), H, D, generator=g, dtype=torch.float64) if prefix else None
    lo = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    hi = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731  (exact on the rounded inputs)
    ex_o, ex_g = _plain(hi(qkv), hi(pqkv), gh, gw, w, hi(do), hi(dpo))
    lo_o, lo_g = _plain(lo(qkv), lo(pqkv), gh, gw, w, lo(do), lo(dpo))
    # "the same computation in low precision": also the op's reference backend, whose backward
    # recomputes P from the saved lse as the kernels do (see test_window_attention_triton.py)
    ref_o, ref_g = _run(lo(qkv), lo(pqkv), gh, gw, w, lo(do), lo(dpo), "reference")
    got_o, got_g = _run(lo(qkv), lo(pqkv), gh, gw, w, lo(do), lo(dpo), "triton")

    def worse(e, a, b):
        err = lambda t: (t.double() - e.double()).abs().max()  # noqa: E731
        return a if err(a) >= err(b) else b

    for name, a, e, l, r in zip(("o", "prefix_o"), got_o, ex_o, lo_o, ref_o):
        check(name, a, e, worse(e, l, r), dtype)
    for name, a, e, l, r in zip(("dqkv", "dprefix_qkv"), got_g, ex_g, lo_g, ref_g):
        for i, slot in enumerate("qkv"):  # each gradient at its own scale, as the unpacked tests do
            check(f"{name}[{slot}]", a[:, :, i], e[:, :, i], worse(e[:, :, i], l[:, :, i], r[:, :, i]), dtype)


def test_packed_equals_unpacked_and_reference():
    """Bitwise: the packed op on Triton = the unpacked op on Triton fed the same values; the packed op on
    the reference backend = the unpacked reference."""
    B, gh, gw, w, H, D = 1, 8, 8, 4, 2, 64
    qkv, pqkv = (t.float() for t in _inputs(B, gh, gw, w, H, D, True, torch.float32, seed=3))
    do, dpo = torch.randn(B, gh * gw, H, D), torch.randn(B, 4, H, D)
    for backend in ("triton", "reference"):
        got_o, got_g = _run(qkv, pqkv, gh, gw, w, do, dpo, backend)
        ins = [t.detach().clone().requires_grad_() for t in (*qkv.unbind(2), *pqkv.unbind(2))]
        with use_backend(backend):
            o, po = ops.window_attention(*ins[:3], (gh, gw), w, *ins[3:])
            g = torch.autograd.grad((o, po), ins, (do, dpo))
        assert torch.equal(got_o[0], o) and torch.equal(got_o[1], po)
        assert torch.equal(got_g[0], torch.stack(g[:3], 2)) and torch.equal(got_g[1], torch.stack(g[3:], 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_cls_pool(dtype):
    B, gh, gw, w, H, D = 2, 8, 12, 4, 2, 64
    nW = (gh // w) * (gw // w)
    g = torch.Generator().manual_seed(5)
    cqkv = torch.randn(B, nW, 3, H, D, generator=g, dtype=torch.float64)
    kv = torch.randn(B, gh * gw, 2, H, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, nW, H, D, generator=g, dtype=torch.float64)

    def run(fn, cqkv, kv, do):
        cqkv, kv = cqkv.detach().requires_grad_(), kv.detach().requires_grad_()
        o = fn(cqkv, kv)
        return o.detach(), torch.autograd.grad(o, (cqkv, kv), do)

    def plain(cqkv, kv):
        cq, ck, cv = cqkv.unbind(2)
        k, v = kv.unbind(2)
        _, po = ref_window_attention(cq.new_zeros(k.shape), k, v, gh, gw, w, cq, ck, cv)
        return po

    ex = run(plain, cqkv.to(dtype).double(), kv.to(dtype).double(), do.to(dtype).double())
    lo = run(plain, cqkv.to(dtype), kv.to(dtype), do.to(dtype))

    with use_backend("triton", strict=True):
        got = run(lambda a, b: ops.cls_pool_kv(a, b, (gh, gw), w), cqkv.to(dtype), kv.to(dtype), do.to(dtype))
    check("o", got[0], ex[0], lo[0], dtype)
    # the zero token queries of the plain form contribute nothing to k/v gradients of the CLS row
    for name, a, e, l in zip(("dcls_qkv", "dkv"), got[1], ex[1], lo[1]):
        check(name, a, e, l, dtype)


def test_no_copy_of_strided_views():
    """The launchers hand the packed views to the kernels as they are (row stride 3*H*D)."""
    from sapiens2.kernels import window_attention as K

    qkv = torch.randn(1, 16, 3, 2, 64)
    q, k, v = qkv.unbind(2)
    for t in (q, k, v):
        x, stride = K._rows(t, torch.float32)
        assert x.data_ptr() == t.data_ptr() and stride == 3 * 2 * 64
    x, stride = K._rows(torch.randn(16, 1, 2, 64).transpose(0, 1), torch.float32)  # batch stride mismatch: copy
    assert x.is_contiguous() and stride == 128


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_packed(backend):
    qkv, pqkv = (t.float() for t in _inputs(1, 8, 8, 4, 2, 64, True, torch.float32))
    kv = qkv[:, :, 1:].contiguous()
    with use_backend(backend, strict=backend != "reference"):
        torch.library.opcheck(torch.ops.sapiens2.window_attention_qkv, (qkv, pqkv, None, 8, 8, 4, "grid", 0.125))
        torch.library.opcheck(torch.ops.sapiens2.window_attention_qkv, (qkv, None, None, 8, 8, 4, "windows", 0.125))
        torch.library.opcheck(torch.ops.sapiens2.cls_pool_kv, (pqkv, kv, 8, 8, 4, "grid", 0.125))


def test_packed_errors():
    qkv = torch.randn(1, 64, 3, 2, 16)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.window_attention_qkv(qkv[:, :, :2], (8, 8), 4)
    with pytest.raises(ValueError, match="divisible by window"):
        ops.window_attention_qkv(qkv, (8, 8), 3)
    with pytest.raises(ValueError, match="prefix_qkv must have shape"):
        ops.window_attention_qkv(qkv, (8, 8), 4, prefix_qkv=torch.randn(1, 3, 3, 2, 16))
    with pytest.raises(ValueError, match="kv must be"):
        ops.cls_pool_kv(torch.randn(1, 4, 3, 2, 16), qkv, (8, 8), 4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["grid", "windows"])
def test_projected_equals_composition(backend, layout):
    """window_attention_projected (fused backward: the kernel's bias partials, one accumulated
    weight-gradient GEMM) gives the gradients of F.linear + window_attention_qkv."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    B, gh, gw, w, H, D = 2, 8, 8, 4, 2, 16
    C = H * D
    x = torch.randn(B, gh * gw, C, generator=g, dtype=torch.float64)
    px = torch.randn(B, 4, C, generator=g, dtype=torch.float64)
    W = torch.randn(3 * C, C, generator=g, dtype=torch.float64) * 0.2
    b = torch.randn(3 * C, generator=g, dtype=torch.float64)
    do, dpo = torch.randn(B, gh * gw, H, D, generator=g, dtype=torch.float64), torch.randn(B, 4, H, D, generator=g,
                                                                                         dtype=torch.float64)
    dt = torch.float64 if backend == "reference" else torch.float32
    results = []
    for fused in (True, False):
        ins = [t.to(dt).requires_grad_() for t in (x, px, W, b)]
        with use_backend(backend, strict=backend != "reference"):
            if fused:
                o, po = ops.window_attention_projected(ins[0], ins[2], ins[3], H, (gh, gw), w, prefix_x=ins[1],
                                                       layout=layout)
            else:
                qkv = F.linear(ins[0], ins[2], ins[3]).view(B, gh * gw, 3, H, D)
                pqkv = F.linear(ins[1], ins[2], ins[3]).view(B, 4, 3, H, D)
                o, po = ops.window_attention_qkv(qkv, (gh, gw), w, prefix_qkv=pqkv, layout=layout)
            grads = torch.autograd.grad((o, po), ins, (do.to(dt), dpo.to(dt)))
        results.append((o.detach(), po.detach(), grads))
    (o1, po1, g1), (o2, po2, g2) = results
    tol = dict(rtol=1e-10, atol=1e-10) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(po1, po2, **tol)
    for name, a, e in zip(("dx", "dprefix_x", "dweight", "dbias"), g1, g2):
        torch.testing.assert_close(a, e, **tol, msg=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bias_partials(backend):
    """bias_grad=True: per-window column sums of the stored gradients, summing to the bias gradient."""
    qkv, pqkv = (t.float() for t in _inputs(2, 8, 12, 4, 2, 16, True, torch.float32, seed=9))
    with use_backend(backend, strict=backend != "reference"):
        o, po, lse = torch.ops.sapiens2.window_attention_qkv(qkv, pqkv, None, 8, 12, 4, "grid", 0.25)
        do, dpo = torch.randn_like(o), torch.randn_like(po)
        dqkv, dpre, parts = torch.ops.sapiens2.window_attention_qkv_backward(
            do, dpo, qkv, pqkv, None, o, po, lse, 8, 12, 4, "grid", 0.25, True)
        torch.library.opcheck(torch.ops.sapiens2.window_attention_qkv_backward,
                              (do, dpo, qkv, pqkv, None, o, po, lse, 8, 12, 4, "grid", 0.25, True))
    assert parts.shape == (2 * 6, 3, 2, 16) and parts.dtype == torch.float32
    total = dqkv.double().sum((0, 1)) + dpre.double().sum((0, 1))
    torch.testing.assert_close(parts.double().sum(0), total, rtol=1e-5, atol=1e-5)
