"""The window-attention / CLS-pooling CUDA kernels (csrc/kernels/window_attention.cu) executed by the
CPU emulation: forward, lse and every gradient through the public ``sapiens2`` ops on the ``"cuda"``
backend vs float64 plain-torch references under the tolerance rule (windows 4x4 / 2x2 / 8x8, grid
and windows layouts, with and without the CLS prefix, token masks with a fully masked window,
gathered window subsets, head dims 4..128, one real-size bf16 tokenizer slice); q, k, v (and do, o)
as token-strided views of one fused projection output, read without a copy; the global-memory
traffic of each kernel (every input byte read once, every output byte written once); thread-order
independence; opcheck; the bindings' error messages."""

import pytest
import torch

from plain_reference import unwindows, window_attention as ref_window_attention, windows
from sapiens2 import ops
from sapiens2.cuda_tools.emu import DTYPE_CODES, Traffic
from sapiens2.models.config import get_arch
from sapiens2.ops import use_backend
from tolerance import DTYPES, ULP, check, plain_grads


def data(*shape, gen, dtype):
    """float64 values already rounded to ``dtype`` (the exact reference sees the kernel's inputs)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).double()


def gathered(x, gh, gw, w, sel):
    """The windows ``sel`` of a grid-layout (B, gh*gw, H, D) tensor, in the "windows" layout."""
    B, _, H, D = x.shape
    xw = windows(x, gh, gw, w)  # (B, nW, w*w, H, D)
    idx = list(range(xw.shape[1])) if sel == "all" else [xw.shape[1] - 1] if sel == "one" else sel
    return xw[:, idx].reshape(B, -1, H, D)


def ref_any_layout(q, k, v, gh, gw, w, layout, pq=None, pk=None, pv=None, token_mask=None):
    """plain_reference.window_attention (grid layout) for either layout: K gathered windows are
    laid out as a w x K*w grid whose windows are them, in order."""
    if layout == "grid":
        return ref_window_attention(q, k, v, gh, gw, w, pq, pk, pv, token_mask)
    B, L, H, D = q.shape
    K = L // (w * w)
    to_grid = lambda t: unwindows(t.reshape(B, K, w * w, H, D), w, K * w, w)  # noqa: E731
    out = ref_window_attention(to_grid(q), to_grid(k), to_grid(v), w, K * w, w, pq, pk, pv)
    back = lambda t: windows(t, w, K * w, w).reshape(B, L, H, D)  # noqa: E731
    return (back(out[0]), out[1]) if pq is not None else back(out)


def ref_cls_pool(cq, ck, cv, k, v, gh, gw, w, layout):
    B, nW, H, D = cq.shape
    kw, vw = ((windows(t, gh, gw, w) if layout == "grid" else t.reshape(B, nW, w * w, H, D)) for t in (k, v))
    ka, va = torch.cat([ck[:, :, None], kw], 2), torch.cat([cv[:, :, None], vw], 2)
    s = torch.einsum("bwhd,bwjhd->bwhj", cq, ka) * D**-0.5
    return torch.einsum("bwhj,bwjhd->bwhd", torch.softmax(s, -1), va)


def check_lse(got, exact, low, name="lse"):
    """lse (and the bias partials) are fp32 whatever the inputs: the tolerance rule with fp32's ulp."""
    err = (got.double() - exact.double()).abs().max().item()
    ref_err = (low.double() - exact.double()).abs().max().item()
    bound = 2 * ref_err + ULP[torch.float32] * max(exact.abs().max().item(), 1e-30)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e})"


# ---------------------------------------------------------------------------------------------- window attention

# (B, gh, gw, w, heads, D, prefix, layout, mask, sel): sel = gathered windows of the windows layout
CASES = [
    (1, 8, 8, 4, 2, 64, True, "grid", False, None),  # the tokenizer's 16 tokens + CLS = 17 rows
    (2, 8, 12, 4, 3, 76, True, "grid", True, None),  # mask incl. a fully masked window (CLS key left)
    (2, 8, 8, 4, 2, 80, False, "grid", True, None),  # fully masked window without prefix: zeros
    (1, 8, 12, 4, 2, 80, True, "windows", False, [5, 0, 3]),
    (2, 8, 8, 4, 2, 64, False, "windows", False, "one"),
    (1, 8, 8, 4, 2, 128, True, "windows", False, "all"),
    (1, 4, 6, 2, 2, 16, True, "grid", True, None),  # 2x2 windows: 5 rows
    (1, 4, 4, 2, 3, 4, False, "windows", False, "all"),
    (1, 8, 16, 8, 1, 64, True, "grid", False, None),  # 8x8 windows + CLS: 65 rows
    (1, 16, 8, 8, 2, 32, False, "windows", False, [1, 0]),
    (1, 8, 8, 8, 1, 16, False, "grid", True, None),
]


def _window_case(B, gh, gw, w, H, D, prefix, layout, mask, sel, dtype, seed=0, use_prefix_out=True):
    (q, k, v, *pre), tm, do, dpo = _qkv_inputs(B, gh, gw, w, H, D, prefix, layout, mask, sel, dtype, seed)
    if not use_prefix_out:
        dpo = None

    def fn(q, k, v, *p):
        out = ref_any_layout(q, k, v, gh, gw, w, layout, *p, token_mask=tm)
        if not prefix:
            return out.flatten()
        return torch.cat([out[0].flatten(), out[1].flatten()]) if use_prefix_out else out[0].flatten()

    ins = [q, k, v] + pre
    g = torch.cat([do.flatten(), dpo.flatten()]) if dpo is not None else do.flatten()
    ex_out, ex_g = plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = plain_grads(fn, ins, dtype, g)

    xs = [t.to(dtype).requires_grad_() for t in ins]
    out = ops.window_attention(xs[0], xs[1], xs[2], (gh, gw), w, *xs[3:], layout=layout, token_mask=tm)
    o, po = out if prefix else (out, None)
    if prefix and use_prefix_out:
        grads = torch.autograd.grad([o, po], xs, [do.to(dtype), dpo.to(dtype)])
    else:  # the prefix output unused: its gradient is None (the kernel reads no dprefix_o, no prefix_o)
        grads = torch.autograd.grad(o, xs, do.to(dtype))
    n = o.numel()
    check("o", o.detach(), ex_out[:n].view(o.shape), lo_out[:n].view(o.shape), dtype)
    if prefix and use_prefix_out:
        check("prefix_o", po.detach(), ex_out[n:].view(po.shape), lo_out[n:].view(po.shape), dtype)
    for name, got, e, lo in zip(["dq", "dk", "dv", "dprefix_q", "dprefix_k", "dprefix_v"], grads, ex_g, lo_g):
        check(name, got, e, lo, dtype)
    if mask and not prefix:  # the fully masked window: o = 0 and zero gradients
        for t in (o.detach(), *grads):
            assert (windows(t, gh, gw, w)[0, 0] == 0).all()

    # the saved lse, against the reference op's (float64 inputs: exact; the input dtype: low)
    args = (gh, gw, w, layout, D**-0.5)
    exact = ins if prefix else ins + [None] * 3
    low = [None if t is None else t.to(dtype) for t in exact]
    lse = torch.ops.sapiens2.window_attention(*low, tm, *args)[2]
    with use_backend("reference"):
        ex_lse = torch.ops.sapiens2.window_attention(*exact, tm, *args)[2]
        lo_lse = torch.ops.sapiens2.window_attention(*low, tm, *args)[2]
    check_lse(lse, ex_lse, lo_lse)


def _case_id(c):
    B, gh, gw, w, H, D, prefix, layout, mask, sel = c
    return f"w{w}_D{D}_{layout}{'' if sel is None else '-' + str(sel).replace(' ', '')}" + \
        ("_cls" if prefix else "") + ("_mask" if mask else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_window_attention(case, dtype, emulated_cuda):
    _window_case(*case, dtype)


def test_window_attention_prefix_output_unused(emulated_cuda):
    _window_case(1, 8, 8, 4, 2, 64, True, "grid", True, None, torch.float32, use_prefix_out=False)


def _tokenizer_heads():
    cfg = get_arch("sapiens2_1b")  # the 1B-4K tokenizer: 24 heads of 64
    return cfg.num_heads, cfg.head_dim


def test_window_attention_real_size_bf16(emulated_cuda):
    """A 32x24 patch slice of the 1B-4K tokenizer: 48 windows of 4x4 + CLS, 24 heads of 64, bf16."""
    H, D = _tokenizer_heads()
    assert (H, D) == (24, 64)
    _window_case(1, 32, 24, 4, H, D, True, "grid", False, None, torch.bfloat16, seed=5)


# ---------------------------------------------------------------------------------------------- cls_pool

CLS_CASES = [
    (2, 8, 8, 4, 2, 64, "grid", None),
    (1, 8, 12, 4, 2, 76, "windows", [4, 1, 2]),
    (1, 8, 8, 4, 3, 80, "windows", "one"),
    (1, 4, 6, 2, 2, 16, "grid", None),
    (1, 8, 16, 8, 1, 64, "windows", "all"),
    (1, 8, 8, 4, 2, 128, "grid", None),
]


def _cls_case(B, gh, gw, w, H, D, layout, sel, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    k, v = (data(B, gh * gw, H, D, gen=gen, dtype=dtype) for _ in range(2))
    if layout == "windows":
        k, v = (gathered(t, gh, gw, w, sel) for t in (k, v))
    nW = k.shape[1] // (w * w)
    cq, ck, cv = (data(B, nW, H, D, gen=gen, dtype=dtype) for _ in range(3))
    do = data(B, nW, H, D, gen=gen, dtype=dtype)
    ins = [cq, ck, cv, k, v]
    fn = lambda *a: ref_cls_pool(*a, gh, gw, w, layout)  # noqa: E731
    ex_out, ex_g = plain_grads(fn, ins, torch.float64, do)
    lo_out, lo_g = plain_grads(fn, ins, dtype, do)
    xs = [t.to(dtype).requires_grad_() for t in ins]
    o = ops.cls_pool(*xs, (gh, gw), w, layout=layout)
    grads = torch.autograd.grad(o, xs, do.to(dtype))
    check("o", o.detach(), ex_out, lo_out, dtype)
    for name, got, e, lo in zip(["dcls_q", "dcls_k", "dcls_v", "dk", "dv"], grads, ex_g, lo_g):
        check(name, got, e, lo, dtype)
    args = (gh, gw, w, layout, D**-0.5)
    lse = torch.ops.sapiens2.cls_pool(*(t.to(dtype) for t in ins), *args)[1]
    with use_backend("reference"):
        ex_lse = torch.ops.sapiens2.cls_pool(*ins, *args)[1]
        lo_lse = torch.ops.sapiens2.cls_pool(*(t.to(dtype) for t in ins), *args)[1]
    assert lse.shape == (B * nW, H, 1)
    check_lse(lse, ex_lse, lo_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CLS_CASES, ids=lambda c: f"w{c[3]}_D{c[5]}_{c[6]}")
def test_cls_pool(case, dtype, emulated_cuda):
    _cls_case(*case, dtype)


def test_cls_pool_real_size_bf16(emulated_cuda):
    H, D = _tokenizer_heads()
    _cls_case(1, 32, 24, 4, H, D, "grid", None, torch.bfloat16, seed=6)


# ---------------------------------------------------------------------------------------------- packed q/k/v

# (B, gh, gw, w, heads, D, prefix, layout, mask, sel)
QKV_CASES = [
    (1, 8, 12, 4, 2, 64, True, "grid", True, None),  # 4x4 + CLS, a fully masked window
    (2, 8, 8, 4, 3, 20, False, "windows", False, [3, 0]),
    (1, 4, 6, 2, 2, 16, True, "grid", False, None),  # 2x2 windows: 5 rows
    (1, 8, 16, 8, 1, 32, True, "windows", False, "all"),  # 8x8 + CLS: 65 rows
]


def _qkv_inputs(B, gh, gw, w, H, D, prefix, layout, mask, sel, dtype, seed):
    """q, k, v, the prefix rows (float64, rounded to dtype), token mask, do and dpo."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (data(B, gh * gw, H, D, gen=gen, dtype=dtype) for _ in range(3))
    if layout == "windows":
        q, k, v = (gathered(t, gh, gw, w, sel) for t in (q, k, v))
    nW = q.shape[1] // (w * w)
    pre = [data(B, nW, H, D, gen=gen, dtype=dtype) for _ in range(3)] if prefix else []
    tm = None
    if mask:
        tm = torch.rand(B, gh * gw, generator=gen) > 0.4
        tm.view(B, gh // w, w, gw // w, w)[0, 0, :, 0, :] = False  # window 0 of batch 0: every key masked
    do = data(*q.shape, gen=gen, dtype=dtype)
    dpo = data(B, nW, H, D, gen=gen, dtype=dtype) if prefix else None
    return [q, k, v] + pre, tm, do, dpo


def _partials_bound(dqkv, dpre, gh, gw, w, layout):
    """bias_partials_ref in float64 of the stored gradients, and the fp32 summation error bound
    (n - 1) * eps * sum |terms| per element (any order of the n = w*w (+1) terms)."""
    from sapiens2.ops.window_attention_packed import bias_partials_ref

    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = bias_partials_ref(d(dqkv), d(dpre), gh, gw, w, layout)
    mag = bias_partials_ref(d(dqkv).abs(), None if dpre is None else d(dpre).abs(), gh, gw, w, layout)
    n = w * w + (0 if dpre is None else 1)
    return exact, (n - 1) * ULP[torch.float32] * mag + 1e-30


def _check_partials(parts, dqkv, dpre, gh, gw, w, layout):
    exact, bound = _partials_bound(dqkv, dpre, gh, gw, w, layout)
    assert parts.dtype == torch.float32 and parts.shape == exact.shape
    assert ((parts.double() - exact).abs() <= bound).all(), "bias partials differ from bias_partials_ref"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QKV_CASES, ids=_case_id)
def test_window_attention_qkv_backward(case, dtype, emulated_cuda):
    """sapiens2::window_attention_qkv_backward on the CUDA kernels: packed dqkv / dprefix_qkv vs float64
    (tolerance rule; the low-precision computation is the reference backend's), the bias partials vs
    bias_partials_ref of the returned gradients, and the autograd path of window_attention_qkv."""
    B, gh, gw, w, H, D, prefix, layout, mask, sel = case
    ins, tm, do, dpo = _qkv_inputs(*case, dtype, seed=21)
    g = torch.cat([do.flatten(), dpo.flatten()]) if prefix else do.flatten()

    def fn(q, k, v, *p):
        out = ref_any_layout(q, k, v, gh, gw, w, layout, *p, token_mask=tm)
        return torch.cat([out[0].flatten(), out[1].flatten()]) if prefix else out.flatten()

    _, ex_g = plain_grads(fn, ins, torch.float64, g)
    ex_dqkv = torch.stack(ex_g[:3], 2)
    ex_dpre = torch.stack(ex_g[3:], 2) if prefix else None
    qkv = torch.stack(ins[:3], 2).to(dtype)
    pqkv = torch.stack(ins[3:], 2).to(dtype) if prefix else None
    args = (gh, gw, w, layout, D**-0.5)
    S = torch.ops.sapiens2
    o, po, lse = S.window_attention_qkv(qkv, pqkv, tm, *args)
    dpo_l = dpo.to(dtype) if prefix else None
    dqkv, dpre, parts = S.window_attention_qkv_backward(do.to(dtype), dpo_l, qkv, pqkv, tm, o, po, lse, *args, True)
    with use_backend("reference"):  # the same op in plain PyTorch: in float64 (exact) and in dtype
        ro, rpo, rlse = S.window_attention_qkv(qkv, pqkv, tm, *args)
        lo = S.window_attention_qkv_backward(do.to(dtype), dpo_l, qkv, pqkv, tm, ro, rpo, rlse, *args, True)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        eo, epo, else_ = S.window_attention_qkv(d(qkv), d(pqkv), tm, *args)
        ex = S.window_attention_qkv_backward(do, dpo, d(qkv), d(pqkv), tm, eo, epo, else_, *args, True)
    torch.testing.assert_close(ex[0], ex_dqkv, rtol=1e-9, atol=1e-9)  # the two float64 references agree
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    for j, name in enumerate(("dq", "dk", "dv")):
        check(name, dqkv[:, :, j], ex_dqkv[:, :, j], lo[0][:, :, j], dtype)
    if prefix:
        assert dpre.shape == pqkv.shape and dpre.is_contiguous()
        torch.testing.assert_close(ex[1], ex_dpre, rtol=1e-9, atol=1e-9)
        for j, name in enumerate(("dprefix_q", "dprefix_k", "dprefix_v")):
            check(name, dpre[:, :, j], ex_dpre[:, :, j], lo[1][:, :, j], dtype)
    else:
        assert dpre.numel() == 0
    _check_partials(parts, dqkv, dpre if prefix else None, gh, gw, w, layout)
    # the q/k/v bias gradient they sum to, under the tolerance rule (the reference backend's in dtype)
    db = parts.sum(0).reshape(-1)
    check_lse(db, ex[2].sum(0).reshape(-1), lo[2].sum(0).reshape(-1), "bias gradient")

    # without bias_grad: the same gradients, no partials; and autograd through the public packed op
    g2 = S.window_attention_qkv_backward(do.to(dtype), dpo_l, qkv, pqkv, tm, o, po, lse, *args, False)
    assert torch.equal(g2[0], dqkv) and torch.equal(g2[1], dpre) and g2[2].numel() == 0
    xs = [qkv.requires_grad_()] + ([pqkv.requires_grad_()] if prefix else [])
    out = ops.window_attention_qkv(qkv, (gh, gw), w, prefix_qkv=pqkv, layout=layout, token_mask=tm)
    outs, gos = ((list(out), [do.to(dtype), dpo_l]) if prefix else ([out], [do.to(dtype)]))
    grads = torch.autograd.grad(outs, xs, gos)
    assert torch.equal(grads[0], dqkv) and (not prefix or torch.equal(grads[1], dpre))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CLS_CASES[0], CLS_CASES[1], CLS_CASES[3], CLS_CASES[4]],
                         ids=lambda c: f"w{c[3]}_D{c[5]}_{c[6]}")
def test_cls_pool_kv_backward(case, dtype, emulated_cuda):
    """sapiens2::cls_pool_kv_backward on the CUDA kernels: packed dcls_qkv / dkv vs float64 (tolerance
    rule, low = the reference backend), and autograd through cls_pool_kv."""
    B, gh, gw, w, H, D, layout, sel = case
    gen = torch.Generator().manual_seed(23)
    k, v = (data(B, gh * gw, H, D, gen=gen, dtype=dtype) for _ in range(2))
    if layout == "windows":
        k, v = (gathered(t, gh, gw, w, sel) for t in (k, v))
    nW = k.shape[1] // (w * w)
    cq, ck, cv = (data(B, nW, H, D, gen=gen, dtype=dtype) for _ in range(3))
    do = data(B, nW, H, D, gen=gen, dtype=dtype)
    ins = [cq, ck, cv, k, v]
    _, ex_g = plain_grads(lambda *a: ref_cls_pool(*a, gh, gw, w, layout), ins, torch.float64, do)
    cqkv, kv = torch.stack(ins[:3], 2).to(dtype), torch.stack(ins[3:], 2).to(dtype)
    args = (gh, gw, w, layout, D**-0.5)
    S = torch.ops.sapiens2
    o, lse = S.cls_pool_kv(cqkv, kv, *args)
    dcqkv, dkv = S.cls_pool_kv_backward(do.to(dtype), cqkv, kv, o, lse, *args)
    with use_backend("reference"):
        ro, rlse = S.cls_pool_kv(cqkv, kv, *args)
        lo = S.cls_pool_kv_backward(do.to(dtype), cqkv, kv, ro, rlse, *args)
    assert dcqkv.shape == cqkv.shape and dkv.shape == kv.shape and dcqkv.is_contiguous() and dkv.is_contiguous()
    for j, name in enumerate(("dcls_q", "dcls_k", "dcls_v")):
        check(name, dcqkv[:, :, j], ex_g[j], lo[0][:, :, j], dtype)
    for j, name in enumerate(("dk", "dv")):
        check(name, dkv[:, :, j], ex_g[3 + j], lo[1][:, :, j], dtype)
    xs = [cqkv.requires_grad_(), kv.requires_grad_()]
    grads = torch.autograd.grad(ops.cls_pool_kv(*xs, (gh, gw), w, layout=layout), xs, do.to(dtype))
    assert torch.equal(grads[0], dcqkv) and torch.equal(grads[1], dkv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix,layout,mask", [(True, "grid", True), (False, "windows", False)])
def test_window_attention_projected_gradients(prefix, layout, mask, dtype, emulated_cuda):
    """window_attention_projected (the packed backward with bias_grad=True: the bias gradient is the
    sum of the kernel's partials) vs float64 plain torch: output and the gradients of x, prefix_x,
    weight and bias under the tolerance rule."""
    from sapiens2.ops.window_attention_proj import window_attention_projected

    gen = torch.Generator().manual_seed(31)
    B, gh, gw, w, H, D, C = 1, 8, 8, 4, 2, 16, 24
    L, nW = gh * gw, (gh // w) * (gw // w)
    x = torch.randn(B, L, C, generator=gen, dtype=torch.float64)
    px = torch.randn(B, nW, C, generator=gen, dtype=torch.float64) if prefix else None
    weight = torch.randn(3 * H * D, C, generator=gen, dtype=torch.float64) * C**-0.5
    bias = torch.randn(3 * H * D, generator=gen, dtype=torch.float64) * 0.1
    tm = None
    if mask:
        tm = torch.rand(B, L, generator=gen) > 0.3
    ins = [x, weight, bias] + ([px] if prefix else [])
    do = torch.randn(B, L, H, D, generator=gen, dtype=torch.float64)
    dpo = torch.randn(B, nW, H, D, generator=gen, dtype=torch.float64) if prefix else None
    g = torch.cat([do.flatten(), dpo.flatten()]) if prefix else do.flatten()

    def fn(x, weight, bias, *p):
        qkv = torch.nn.functional.linear(x, weight, bias).view(B, -1, 3, H, D)
        pre = torch.nn.functional.linear(p[0], weight, bias).view(B, nW, 3, H, D).unbind(2) if prefix else ()
        q, k, v = qkv.unbind(2)
        if layout == "windows":
            out = ref_any_layout(q, k, v, w, L // w, w, "windows", *pre)
        else:
            out = ref_any_layout(q, k, v, gh, gw, w, "grid", *pre, token_mask=tm)
        return torch.cat([out[0].flatten(), out[1].flatten()]) if prefix else out.flatten()

    ex_out, ex_g = plain_grads(fn, ins, torch.float64, g)
    lo_out, lo_g = plain_grads(fn, ins, dtype, g)
    xs = [t.to(dtype).requires_grad_() for t in ins]
    grid = (gh, gw) if layout == "grid" else (w, L // w)
    out = window_attention_projected(xs[0], xs[1], xs[2], H, grid, w, prefix_x=xs[3] if prefix else None,
                                     layout=layout, token_mask=tm)
    outs = list(out) if prefix else [out]
    grads = torch.autograd.grad(outs, xs, [do.to(dtype)] + ([dpo.to(dtype)] if prefix else []))
    got = torch.cat([t.detach().flatten() for t in outs])
    check("out", got, ex_out, lo_out, dtype)
    for name, got, e, lo in zip(["dx", "dweight", "dbias", "dprefix_x"], grads, ex_g, lo_g):
        check(name, got, e, lo, dtype)


# ---------------------------------------------------------------------------------------------- strided q, k, v

def _fused(B, L, n, H, D, dtype, gen):
    """n (B, L, H, D) views of one (B, L, n*H*D) tensor (a fused projection output): token stride n*H*D."""
    buf = torch.randn(B, L, n * H * D, generator=gen).to(dtype)
    return buf, buf.view(B, L, n, H, D).unbind(2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["grid", "windows"])
def test_strided_views_read_in_place(layout, dtype, emulated_cuda):
    """q, k, v, the prefix, do and o as token-strided slices of fused tensors: passed to the kernels
    without a copy, bit-identical to the contiguous call, forward and backward (and cls_pool)."""
    from sapiens2.ops.cuda import window_attention as adapter

    gen = torch.Generator().manual_seed(11)
    B, gh, gw, w, H, D = 2, 8, 8, 4, 3, 64
    L, nW = gh * gw, (gh // w) * (gw // w)
    _, (q, k, v) = _fused(B, L, 3, H, D, dtype, gen)
    _, (pq, pk, pv) = _fused(B, nW, 3, H, D, dtype, gen)
    assert q.stride() == (L * 3 * H * D, 3 * H * D, D, 1) and not q.is_contiguous()
    assert all(adapter._rows(t) is t for t in (q, k, v, pq, pk, pv))  # no copy
    tm = (torch.rand(B, L, generator=gen) > 0.3) if layout == "grid" else None
    args, scale = (gh, gw, w, layout), D**-0.5
    E = torch.ops.sapiens2_emu
    c = lambda ts: [t.contiguous() for t in ts]  # noqa: E731
    got = E.window_attention_fwd(q, k, v, pq, pk, pv, tm, *args, scale)
    want = E.window_attention_fwd(*c((q, k, v, pq, pk, pv)), tm, *args, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    _, (do, o) = _fused(B, L, 2, H, D, dtype, gen)  # do and a strided copy of the forward's o
    o.copy_(want[0])
    _, (dpo, po) = _fused(B, nW, 2, H, D, dtype, gen)
    po.copy_(want[1])
    got = E.window_attention_bwd(do, dpo, q, k, v, pq, pk, pv, tm, o, po, want[2], *args, scale)
    want_g = E.window_attention_bwd(*c((do, dpo, q, k, v, pq, pk, pv)), tm, *c((o, po)), want[2], *args, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want_g))

    got = E.cls_pool_fwd(pq, pk, pv, k, v, *args, scale)
    want = E.cls_pool_fwd(*c((pq, pk, pv, k, v)), *args, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    _, (dco, co) = _fused(B, nW, 2, H, D, dtype, gen)
    co.copy_(want[0])
    got = E.cls_pool_bwd(dco, pq, pk, pv, k, v, co, want[1], *args, scale)
    want = E.cls_pool_bwd(*c((dco, pq, pk, pv, k, v, co)), want[1], *args, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_strided_views_autograd(emulated_cuda):
    """Through the public op with autograd: the fused tensor's gradient equals the contiguous path's."""
    gen = torch.Generator().manual_seed(12)
    B, gh, gw, w, H, D = 1, 8, 8, 4, 2, 64
    qkv = torch.randn(B, gh * gw, 3 * H * D, generator=gen).bfloat16().requires_grad_()
    pqkv = torch.randn(B, 4, 3 * H * D, generator=gen).bfloat16().requires_grad_()
    do = torch.randn(B, gh * gw, H, D, generator=gen).bfloat16()
    dpo = torch.randn(B, 4, H, D, generator=gen).bfloat16()

    def run(split):
        views = [*split(qkv, gh * gw), *split(pqkv, 4)]
        o, po = ops.window_attention(*views[:3], (gh, gw), w, *views[3:])
        return torch.autograd.grad([o, po], [qkv, pqkv], [do, dpo]), o

    (g1, g2), o1 = run(lambda t, n: t.view(B, n, 3, H, D).unbind(2))
    (h1, h2), o2 = run(lambda t, n: [x.contiguous() for x in t.view(B, n, 3, H, D).unbind(2)])
    assert torch.equal(o1, o2) and torch.equal(g1, h1) and torch.equal(g2, h2)


# ---------------------------------------------------------------------------------------------- traffic


def _rows_args(*ts):
    out = []
    for t in ts:
        out += [None, 0, 0] if t is None else [t, t.stride(0), t.stride(1)]
    return out


def _fwd(lib, code, q, k, v, pre, mask, o, po, lse, B, L, H, D, gh, gw, w, layout):
    args = [code, *_rows_args(q, k, v, *pre), mask, o, po, lse, B, L, H, D, gh, gw, w, layout, 0.125, None]
    lib.call("s2_window_attention_fwd", *args, int_args=(0, len(args) - 3))


def _bwd(lib, code, do, dpo, q, k, v, pre, mask, o, po, lse, grads, B, L, H, D, gh, gw, w, layout, bias=None):
    """grads: dq, dk, dv, dpq, dpk, dpv (None for an absent prefix), each written through its strides."""
    args = [code, *_rows_args(do, dpo, q, k, v, *pre), mask, *_rows_args(o, po), lse, *_rows_args(*grads), bias, B,
            L, H, D, gh, gw, w, layout, 0.125, None]
    lib.call("s2_window_attention_bwd", *args, int_args=(0, len(args) - 3))


def _cls_fwd(lib, code, cq, ck, cv, k, v, o, lse, B, L, H, D, gh, gw, w, layout):
    args = [code, *_rows_args(cq, ck, cv, k, v), o, lse, B, L, H, D, gh, gw, w, layout, 0.125, None]
    lib.call("s2_cls_pool_fwd", *args, int_args=(0, len(args) - 3))


def _cls_bwd(lib, code, do, cq, ck, cv, k, v, o, lse, grads, B, L, H, D, gh, gw, w, layout):
    args = [code, *_rows_args(do, cq, ck, cv, k, v, o), lse, *_rows_args(*grads), B, L, H, D, gh, gw, w, layout,
            0.125, None]
    lib.call("s2_cls_pool_bwd", *args, int_args=(0, len(args) - 3))


def _assert_once(t, reads=(), writes=(), mask=None, heads=1):
    assert t.untracked == (0, 0)
    for name in reads:
        assert t[name].reads_each_byte == (1, 1) and t[name].write_bytes == 0, (name, t[name])
    for name in writes:
        assert t[name].writes_each_byte == (1, 1) and t[name].read_bytes == 0, (name, t[name])
    if mask is not None:  # 1 byte per token, read once per head
        assert t[mask].reads_each_byte == (heads, heads), t[mask]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout,prefix", [("grid", True), ("windows", False)])
def test_traffic_each_byte_once(layout, prefix, dtype, emu_lib, schedule):
    """Global-memory traffic counted by the emulator, byte by byte: every input read exactly once,
    every output written exactly once, nothing touched outside the tensors. q, k, v are views of one
    fused buffer (tracked whole: each of its bytes read once)."""
    gen = torch.Generator().manual_seed(1)
    code = DTYPE_CODES[dtype]
    B, gh, gw, w, H, D = 2, 8, 12, 4, 3, 20
    L, nW, S = gh * gw, (gh // w) * (gw // w), w * w + (1 if prefix else 0)
    qkv, (q, k, v) = _fused(B, L, 3, H, D, dtype, gen)
    pqkv, pre = _fused(B, nW, 3, H, D, dtype, gen) if prefix else (None, (None,) * 3)
    mask = (torch.rand(B, L, generator=gen) > 0.3) if layout == "grid" else None
    o = torch.empty(B, L, H, D, dtype=dtype)
    po = torch.empty(B, nW, H, D, dtype=dtype) if prefix else None
    lse = torch.empty(B * nW, H, S)
    geo = (B, L, H, D, gh, gw, w, 0 if layout == "grid" else 1)
    with Traffic(emu_lib, qkv=qkv, pqkv=pqkv, mask=mask, o=o, po=po, lse=lse) as t:
        _fwd(emu_lib, code, q, k, v, pre, mask, o, po, lse, *geo)
    _assert_once(t, ["qkv"] + (["pqkv"] if prefix else []), ["o", "lse"] + (["po"] if prefix else []),
                 "mask" if mask is not None else None, H)

    do = torch.randn(B, L, H, D, generator=gen).to(dtype)
    dpo = torch.randn(B, nW, H, D, generator=gen).to(dtype) if prefix else None
    grads = [torch.empty(B, L, H, D, dtype=dtype) for _ in range(3)]
    pgrads = [torch.empty(B, nW, H, D, dtype=dtype) for _ in range(3)] if prefix else [None] * 3
    names = dict(zip(["dq", "dk", "dv", "dpq", "dpk", "dpv"], grads + pgrads))
    with Traffic(emu_lib, do=do, dpo=dpo, qkv=qkv, pqkv=pqkv, mask=mask, o=o, po=po, lse=lse, **names) as t:
        _bwd(emu_lib, code, do, dpo, q, k, v, pre, mask, o, po, lse, grads + pgrads, *geo)
    _assert_once(t, ["do", "qkv", "o", "lse"] + (["dpo", "pqkv", "po"] if prefix else []),
                 [n for n, g in names.items() if g is not None], "mask" if mask is not None else None, H)

    cqkv, (cq, ck, cv) = _fused(B, nW, 3, H, D, dtype, gen)
    co, clse = torch.empty(B, nW, H, D, dtype=dtype), torch.empty(B * nW, H, 1)
    with Traffic(emu_lib, cqkv=cqkv, qkv=qkv, co=co, clse=clse) as t:
        _cls_fwd(emu_lib, code, cq, ck, cv, k, v, co, clse, *geo)
    assert t["qkv"].read_bytes == 2 * qkv.numel() * qkv.element_size() // 3  # k and v slots, once
    assert t["qkv"].reads_each_byte == (0, 1)
    _assert_once(t, ["cqkv"], ["co", "clse"])

    cdo = torch.randn(B, nW, H, D, generator=gen).to(dtype)
    cg = {n: torch.empty(B, nW, H, D, dtype=dtype) for n in ("dcq", "dck", "dcv")}
    tg = {n: torch.empty(B, L, H, D, dtype=dtype) for n in ("dk", "dv")}
    with Traffic(emu_lib, cdo=cdo, cqkv=cqkv, qkv=qkv, co=co, clse=clse, **cg, **tg) as t:
        _cls_bwd(emu_lib, code, cdo, cq, ck, cv, k, v, co, clse, [*cg.values(), *tg.values()], *geo)
    assert t["qkv"].reads_each_byte == (0, 1)
    # the CLS softmax and delta are recomputed whole from the scores: neither lse nor O is read
    for name in ("clse", "co"):
        assert t[name].read_bytes == 0 and t[name].write_bytes == 0, (name, t[name])
    _assert_once(t, ["cdo", "cqkv"], [*cg, *tg])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout,prefix", [("grid", True), ("windows", False)])
def test_traffic_packed_gradients(layout, prefix, dtype, emu_lib, schedule):
    """The backward kernels writing packed gradients through their output strides: dq, dk, dv as the
    slots of one dqkv (dpq, dpk, dpv of one dprefix_qkv; dcls q/k/v and dk/dv of packed dcls_qkv and
    dkv), each buffer tracked whole: every byte written exactly once, the fp32 bias partials too, the
    inputs read once, nothing else touched; bits identical to the contiguous outputs, and the
    partials those of bias_partials_ref (in either thread order)."""
    from sapiens2.ops.window_attention_packed import bias_partials_ref

    gen = torch.Generator().manual_seed(7)
    code = DTYPE_CODES[dtype]
    B, gh, gw, w, H, D = 2, 8, 12, 4, 3, 20
    L, nW, S = gh * gw, (gh // w) * (gw // w), w * w + (1 if prefix else 0)
    qkv, (q, k, v) = _fused(B, L, 3, H, D, dtype, gen)
    pqkv, pre = _fused(B, nW, 3, H, D, dtype, gen) if prefix else (None, (None,) * 3)
    mask = (torch.rand(B, L, generator=gen) > 0.3) if layout == "grid" else None
    geo = (B, L, H, D, gh, gw, w, 0 if layout == "grid" else 1)
    o, lse = torch.empty(B, L, H, D, dtype=dtype), torch.empty(B * nW, H, S)
    po = torch.empty(B, nW, H, D, dtype=dtype) if prefix else None
    _fwd(emu_lib, code, q, k, v, pre, mask, o, po, lse, *geo)
    do = torch.randn(B, L, H, D, generator=gen).to(dtype)
    dpo = torch.randn(B, nW, H, D, generator=gen).to(dtype) if prefix else None

    dqkv = torch.empty(B, L, 3, H, D, dtype=dtype)
    dpqkv = torch.empty(B, nW, 3, H, D, dtype=dtype) if prefix else None
    parts = torch.empty(B * nW, 3, H, D)
    grads = [*dqkv.unbind(2), *(dpqkv.unbind(2) if prefix else (None,) * 3)]
    with Traffic(emu_lib, do=do, dpo=dpo, qkv=qkv, pqkv=pqkv, mask=mask, o=o, po=po, lse=lse, dqkv=dqkv,
                 dpqkv=dpqkv, parts=parts) as t:
        _bwd(emu_lib, code, do, dpo, q, k, v, pre, mask, o, po, lse, grads, *geo, bias=parts)
    _assert_once(t, ["do", "qkv", "o", "lse"] + (["dpo", "pqkv", "po"] if prefix else []),
                 ["dqkv", "parts"] + (["dpqkv"] if prefix else []), "mask" if mask is not None else None, H)
    dense = [torch.empty(B, L, H, D, dtype=dtype) for _ in range(3)]
    dense += [torch.empty(B, nW, H, D, dtype=dtype) for _ in range(3)] if prefix else [None] * 3
    _bwd(emu_lib, code, do, dpo, q, k, v, pre, mask, o, po, lse, dense, *geo)
    assert torch.equal(dqkv, torch.stack(dense[:3], 2))
    if prefix:
        assert torch.equal(dpqkv, torch.stack(dense[3:], 2))
    ref = bias_partials_ref(dqkv, dpqkv, gh, gw, w, layout)
    exact, bound = _partials_bound(dqkv, dpqkv, gh, gw, w, layout)
    assert ((parts.double() - exact).abs() <= bound).all()
    assert ((ref.double() - exact).abs() <= bound).all()

    cqkv, (cq, ck, cv) = _fused(B, nW, 3, H, D, dtype, gen)
    co, clse = torch.empty(B, nW, H, D, dtype=dtype), torch.empty(B * nW, H, 1)
    _cls_fwd(emu_lib, code, cq, ck, cv, k, v, co, clse, *geo)
    cdo = torch.randn(B, nW, H, D, generator=gen).to(dtype)
    dcqkv, dkv = torch.empty(B, nW, 3, H, D, dtype=dtype), torch.empty(B, L, 2, H, D, dtype=dtype)
    with Traffic(emu_lib, cdo=cdo, cqkv=cqkv, qkv=qkv, co=co, clse=clse, dcqkv=dcqkv, dkv=dkv) as t:
        _cls_bwd(emu_lib, code, cdo, cq, ck, cv, k, v, co, clse, [*dcqkv.unbind(2), *dkv.unbind(2)], *geo)
    assert t["qkv"].reads_each_byte == (0, 1)  # the k and v slots only
    assert t["co"].read_bytes == 0 and t["clse"].read_bytes == 0  # recomputed from the scores
    _assert_once(t, ["cdo", "cqkv"], ["dcqkv", "dkv"])
    dense = [torch.empty(B, nW, H, D, dtype=dtype) for _ in range(3)] + [torch.empty(B, L, H, D, dtype=dtype)
                                                                       for _ in range(2)]
    _cls_bwd(emu_lib, code, cdo, cq, ck, cv, k, v, co, clse, dense, *geo)
    assert torch.equal(dcqkv, torch.stack(dense[:3], 2)) and torch.equal(dkv, torch.stack(dense[3:], 2))


def test_traffic_scalar_path_misaligned(emu_lib):
    """A storage offset of one element defeats the 4-element vector accesses: the scalar path reads and
    writes each byte once too, and gives the same bits."""
    dtype, code = torch.bfloat16, DTYPE_CODES[torch.bfloat16]
    B, gh, gw, w, H, D = 1, 4, 8, 4, 2, 12
    L, nW = gh * gw, 2
    n = B * L * H * D
    buf = torch.randn(3 * n + 1).to(dtype)
    q, k, v = (buf[1 + i * n:1 + (i + 1) * n].view(B, L, H, D) for i in range(3))
    assert q.data_ptr() % 8 != 0
    pre = [torch.randn(B, nW, H, D).to(dtype) for _ in range(3)]
    geo = (B, L, H, D, gh, gw, w, 0)
    outs = []
    for src in ((q, k, v), tuple(t.clone() for t in (q, k, v))):
        o, po, lse = torch.empty(B, L, H, D, dtype=dtype), torch.empty(B, nW, H, D, dtype=dtype), torch.empty(B * nW, H, 17)
        with Traffic(emu_lib, buf=buf, pq=pre[0], pk=pre[1], pv=pre[2], o=o, po=po, lse=lse) as t:
            _fwd(emu_lib, code, *src, pre, None, o, po, lse, *geo)
        if src[0] is q:
            assert t["buf"].reads_each_byte == (0, 1) and t["buf"].read_bytes == 3 * n * 2
            _assert_once(t, ["pq", "pk", "pv"], ["o", "po", "lse"])
        outs.append((o, po, lse))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_thread_order_does_not_change_results(emu_lib):
    """The same launches with every block's threads resumed in reverse order give identical bits (a
    missing barrier would show)."""
    dtype, code = torch.bfloat16, DTYPE_CODES[torch.bfloat16]
    gen = torch.Generator().manual_seed(2)
    B, gh, gw, w, H, D = 1, 8, 8, 4, 3, 16
    L, nW = gh * gw, 4
    q, k, v, do = (torch.randn(B, L, H, D, generator=gen).to(dtype) for _ in range(4))
    pre = [torch.randn(B, nW, H, D, generator=gen).to(dtype) for _ in range(4)]
    mask = torch.rand(B, L, generator=gen) > 0.3
    geo = (B, L, H, D, gh, gw, w, 0)
    results = []
    for rev in (False, True):
        emu_lib.set_reverse(rev)
        try:
            o, po, lse = torch.empty(B, L, H, D, dtype=dtype), torch.empty(B, nW, H, D, dtype=dtype), torch.empty(B * nW, H, 17)
            _fwd(emu_lib, code, q, k, v, pre[:3], mask, o, po, lse, *geo)
            grads = [torch.empty(B, L, H, D, dtype=dtype) for _ in range(3)] + [torch.empty(B, nW, H, D, dtype=dtype)
                                                                              for _ in range(3)]
            parts = torch.empty(B * nW, 3, H, D)
            _bwd(emu_lib, code, do, pre[3], q, k, v, pre[:3], mask, o, po, lse, grads, *geo, bias=parts)
            co, clse = torch.empty(B, nW, H, D, dtype=dtype), torch.empty(B * nW, H, 1)
            _cls_fwd(emu_lib, code, *pre[:3], k, v, co, clse, *geo)
            cg = [torch.empty(B, nW, H, D, dtype=dtype) for _ in range(3)] + [torch.empty(B, L, H, D, dtype=dtype)
                                                                            for _ in range(2)]
            _cls_bwd(emu_lib, code, pre[3], *pre[:3], k, v, co, clse, cg, *geo)
        finally:
            emu_lib.set_reverse(False)
        results.append([o, po, lse, *grads, parts, co, clse, *cg])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- opcheck, errors


def _small(dtype=torch.float32, prefix=True, layout="grid", strided=False):
    gen = torch.Generator().manual_seed(4)
    B, gh, gw, w, H, D = 1, 4, 8, 4, 2, 8
    L = gh * gw
    if strided:
        _, (q, k, v) = _fused(B, L, 3, H, D, dtype, gen)
    else:
        q, k, v = (torch.randn(B, L, H, D, generator=gen).to(dtype) for _ in range(3))
    pre = [torch.randn(B, 2, H, D, generator=gen).to(dtype) for _ in range(3)] if prefix else [None] * 3
    mask = (torch.rand(B, L, generator=gen) > 0.3) if layout == "grid" else None
    return (q, k, v, *pre, mask, gh, gw, w, layout, 0.3)


def test_opcheck(emulated_cuda):
    S, E = torch.ops.sapiens2, torch.ops.sapiens2_emu
    for kw in (dict(), dict(prefix=False, layout="windows"), dict(dtype=torch.bfloat16, strided=True)):
        args = _small(**kw)
        torch.library.opcheck(S.window_attention, args)
        torch.library.opcheck(E.window_attention_fwd, args)
        q, k, v, pq, pk, pv, mask, *rest = args
        o, po, lse = E.window_attention_fwd(*args)
        dpo = torch.randn_like(po) if pq is not None else None
        torch.library.opcheck(E.window_attention_bwd, (torch.randn_like(o), dpo, q, k, v, pq, pk, pv, mask, o, po, lse,
                                                       *rest))
    q, k, v, pq, pk, pv, mask, gh, gw, w, layout, scale = _small()
    torch.library.opcheck(S.cls_pool, (pq, pk, pv, k, v, gh, gw, w, layout, scale))
    o, lse = E.cls_pool_fwd(pq, pk, pv, k, v, gh, gw, w, layout, scale)
    cqkv, kv = torch.stack([pq, pk, pv], 2), torch.stack([k, v], 2)
    for op in (S.cls_pool_kv_backward, E.cls_pool_kv_bwd):
        torch.library.opcheck(op, (torch.randn_like(o), cqkv, kv, o, lse, gh, gw, w, layout, scale))
    o, lse = E.cls_pool_fwd(pq, pk, pv, k, v, gh, gw, w, layout, scale)
    torch.library.opcheck(E.cls_pool_fwd, (pq, pk, pv, k, v, gh, gw, w, layout, scale))
    torch.library.opcheck(E.cls_pool_bwd, (torch.randn_like(o), pq, pk, pv, k, v, o, lse, gh, gw, w, layout, scale))


def test_opcheck_packed_backward(emulated_cuda):
    """The packed backward, sapiens2's op on the cuda backend and the binding, with and without the
    prefix and the bias partials, and on a strided (sliced) qkv."""
    S, E = torch.ops.sapiens2, torch.ops.sapiens2_emu
    for kw, bias in ((dict(), True), (dict(prefix=False, layout="windows"), False),
                     (dict(dtype=torch.bfloat16), True)):
        q, k, v, pq, pk, pv, mask, *rest = _small(**kw)
        qkv = torch.stack([q, k, v], 2)
        pqkv = torch.stack([pq, pk, pv], 2) if pq is not None else None
        o, po, lse = E.window_attention_fwd(q, k, v, pq, pk, pv, mask, *rest)
        dpo = torch.randn_like(po) if pq is not None else None
        args = (torch.randn_like(o), dpo, qkv, pqkv, mask, o, po, lse, *rest, bias)
        torch.library.opcheck(S.window_attention_qkv_backward, args)
        torch.library.opcheck(E.window_attention_qkv_bwd, args)
    wide = torch.randn(1, 32, 4, 2, 8)[:, :, 1:]  # slot stride free, row stride 4*heads*D: read in place
    q, k, v = wide.unbind(2)
    o, po, lse = E.window_attention_fwd(q, k, v, None, None, None, None, 4, 8, 4, "grid", 0.3)
    args = (torch.randn_like(o), None, wide, None, None, o, po, lse, 4, 8, 4, "grid", 0.3, True)
    torch.library.opcheck(E.window_attention_qkv_bwd, args)
    dqkv, _, parts = E.window_attention_qkv_bwd(*args)
    g = E.window_attention_bwd(args[0], None, q, k, v, None, None, None, None, o, po, lse, 4, 8, 4, "grid", 0.3)
    assert dqkv.is_contiguous() and torch.equal(dqkv, torch.stack(g[:3], 2)) and parts.shape == (2, 3, 2, 8)


def test_binding_errors_name_the_argument(_emu_ext):
    E = torch.ops.sapiens2_emu
    x = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="head dim 6 is not supported"):
        E.window_attention_fwd(*[torch.randn(1, 16, 2, 6)] * 3, None, None, None, None, 4, 4, 4, "grid", 0.5)
    with pytest.raises(ValueError, match="head dim 260 is not supported"):
        E.cls_pool_fwd(*[torch.randn(1, 1, 2, 260)] * 3, *[torch.randn(1, 16, 2, 260)] * 2, 4, 4, 4, "grid", 0.5)
    with pytest.raises(ValueError, match="window 9 has 82 rows"):
        E.window_attention_fwd(*[torch.randn(1, 81, 1, 8)] * 3, *[torch.randn(1, 1, 1, 8)] * 3, None, 9, 9, 9,
                               "grid", 0.5)
    with pytest.raises(ValueError, match=r"window 8 with head dim 256 needs \d+ bytes of shared memory"):
        t = torch.randn(1, 64, 1, 256)
        E.window_attention_bwd(t, None, t, t, t, None, None, None, None, t, t.new_empty(0), torch.zeros(1, 1, 64), 8,
                               8, 8, "grid", 0.5)
    with pytest.raises(ValueError, match="k must have contiguous heads and head dim"):
        E.window_attention_fwd(x, torch.randn(1, 16, 8, 2).transpose(2, 3), x, None, None, None, None, 4, 4, 4,
                               "grid", 0.5)
    with pytest.raises(TypeError, match="v has dtype BFloat16 but q has Float"):
        E.window_attention_fwd(x, x, x.bfloat16(), None, None, None, None, 4, 4, 4, "grid", 0.5)
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        E.window_attention_fwd(x.double(), x.double(), x.double(), None, None, None, None, 4, 4, 4, "grid", 0.5)
    with pytest.raises(ValueError, match="token_mask is only supported with layout='grid'"):
        E.window_attention_fwd(x, x, x, None, None, None, torch.ones(1, 16, dtype=torch.bool), 4, 4, 4, "windows", 0.5)
    with pytest.raises(ValueError, match=r"grid \(4, 6\) must be divisible by the window 4"):
        E.window_attention_fwd(*[torch.randn(1, 24, 2, 8)] * 3, None, None, None, None, 4, 6, 4, "grid", 0.5)
    with pytest.raises(ValueError, match=r"prefix_q must have shape \[1, 1, 2, 8\]"):
        E.window_attention_fwd(x, x, x, *[torch.randn(1, 2, 2, 8)] * 3, None, 4, 4, 4, "grid", 0.5)
    with pytest.raises(ValueError, match="layout must be 'grid' or 'windows'"):
        E.window_attention_fwd(x, x, x, None, None, None, None, 4, 4, 4, "rows", 0.5)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, rows, 3, heads, head_dim\)"):
        E.window_attention_qkv_bwd(x, None, torch.randn(1, 16, 2, 2, 8), None, None, x, x.new_empty(0),
                                   torch.zeros(1, 2, 16), 4, 4, 4, "grid", 0.5, True)
    with pytest.raises(ValueError, match=r"kv must be \(batch, rows, 2, heads, head_dim\)"):
        E.cls_pool_kv_bwd(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 2, 8), torch.randn(1, 16, 3, 2, 8),
                          torch.randn(1, 1, 2, 8), torch.zeros(1, 2, 1), 4, 4, 4, "grid", 0.5)
    o, _, lse = E.window_attention_fwd(x, x, x, None, None, None, None, 4, 4, 4, "grid", 0.5)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 16\)"):
        E.window_attention_bwd(x, None, x, x, x, None, None, None, None, o, o.new_empty(0), torch.zeros(1, 2, 8), 4, 4, 4,
                               "grid", 0.5)


def test_python_smem_rule_matches_the_kernels(emu_lib):
    """The adapter's support rule (Triton fallback on GPUs) computes the kernels' shared memory exactly."""
    import ctypes

    from sapiens2.ops.cuda import window_attention as adapter

    f = emu_lib.fn("s2_window_attention_smem_bytes")
    f.restype = ctypes.c_int64
    for kernel in range(4):
        for w in (1, 2, 3, 4, 5, 8):
            for prefix in (False, True):
                for D in (4, 8, 12, 16, 64, 76, 80, 128, 172, 176, 256):
                    got = f(ctypes.c_int(kernel), ctypes.c_int64(w), ctypes.c_int(prefix), ctypes.c_int64(D))
                    assert got == adapter.smem_bytes(kernel, w, prefix, D), (kernel, w, prefix, D)
    assert f(ctypes.c_int(0), ctypes.c_int64(4), ctypes.c_int(1), ctypes.c_int64(6)) == -1
    cpu = torch.device("cpu")
    assert adapter.supported(adapter.BWD, 8, True, 172, cpu) and not adapter.supported(adapter.BWD, 8, True, 176, cpu)
    assert adapter.supported(adapter.FWD, 8, True, 256, cpu) and adapter.supported(adapter.BWD, 4, True, 256, cpu)
    assert not adapter.supported(adapter.FWD, 4, True, 6, cpu) and not adapter.supported(adapter.FWD, 9, False, 64, cpu)


def test_public_op_reports_unsupported_head_dim(emulated_cuda):
    q = torch.randn(1, 16, 2, 6)
    with pytest.raises(ValueError, match="head dim 6"):
        ops.window_attention(q, q, q, (4, 4), 4)


def test_empty_batch(_emu_ext):
    E = torch.ops.sapiens2_emu
    x = torch.randn(0, 16, 2, 8)
    p = torch.randn(0, 1, 2, 8)
    o, po, lse = E.window_attention_fwd(x, x, x, p, p, p, None, 4, 4, 4, "grid", 0.5)
    assert o.shape == x.shape and po.shape == p.shape and lse.shape == (0, 2, 17)
    g = E.window_attention_bwd(x, p, x, x, x, p, p, p, None, o, po, lse, 4, 4, 4, "grid", 0.5)
    assert [t.shape for t in g] == [x.shape] * 3 + [p.shape] * 3
    dqkv, dpre, parts = E.window_attention_qkv_bwd(x, p, torch.stack([x] * 3, 2), torch.stack([p] * 3, 2), None, o,
                                                   po, lse, 4, 4, 4, "grid", 0.5, True)
    assert dqkv.shape == (0, 16, 3, 2, 8) and dpre.shape == (0, 1, 3, 2, 8) and parts.shape == (0, 3, 2, 8)
    o, lse = E.cls_pool_fwd(p, p, p, x, x, 4, 4, 4, "grid", 0.5)
    assert o.shape == p.shape and lse.shape == (0, 2, 1)
    dcqkv, dkv = E.cls_pool_kv_bwd(p, torch.stack([p] * 3, 2), torch.stack([x] * 2, 2), o, lse, 4, 4, 4, "grid", 0.5)
    assert dcqkv.shape == (0, 1, 3, 2, 8) and dkv.shape == (0, 16, 2, 2, 8)
