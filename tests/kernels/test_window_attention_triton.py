"""Triton window attention / cls_pool kernels under the Triton interpreter (CPU tensors), forward and
every gradient, against float64 plain-torch references; plus the AOT compile gate of the shipped
configurations for sm_90a (in a subprocess without the interpreter).

Tolerance: max-abs error vs float64 <= 2 * (error of the same computation run in plain torch in the
low precision) + 1 ulp of the output dtype scaled by the float64 output's max abs. "The same
computation" is measured twice and the larger error is taken: plain softmax + autograd, and the
custom op's reference implementation (``sapiens2.ops``, ``use_backend("reference")``), whose
backward recomputes P from the saved lse exactly as the kernels do (in fp32 that recompute alone
accounts for errors up to ~2x those of autograd).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / sapiens2 are imported

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import sapiens2.ops  # noqa: E402,F401  (registers the custom ops)
from sapiens2.kernels import window_attention as K  # noqa: E402
from sapiens2.ops.backend import use_backend  # noqa: E402

ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


# ---------------------------------------------------------------------------------------------- references


def _windows(x, gh, gw, w, layout):
    """(B, L, H, ...) -> (B, nW, H, w*w, ...) by reshape/permute."""
    B, L, H = x.shape[:3]
    rest = x.shape[3:]
    if layout == "grid":
        x = x.reshape(B, gh // w, w, gw // w, w, H, *rest)
        x = x.permute(0, 1, 3, 5, 2, 4, *range(6, 6 + len(rest)))
        return x.reshape(B, (gh // w) * (gw // w), H, w * w, *rest)
    x = x.reshape(B, L // (w * w), w * w, H, *rest).permute(0, 1, 3, 2, *range(4, 4 + len(rest)))
    return x


def _unwindows(x, gh, gw, w, layout):
    """Inverse of ``_windows`` for (B, nW, H, w*w, D)."""
    B, nW, H, N, D = x.shape
    if layout == "grid":
        x = x.reshape(B, gh // w, gw // w, H, w, w, D).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, gh * gw, H, D)
    return x.permute(0, 1, 3, 2, 4).reshape(B, nW * N, H, D)


def _masked_attention(q, k, v, valid, scale):
    """Softmax attention with a key mask; rows without a valid key give o = 0, lse = 0."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    p = torch.exp(s - m) * valid
    den = p.sum(-1, keepdim=True)
    has = den > 0
    den_safe = torch.where(has, den, torch.ones_like(den))
    o = (p @ v) / den_safe
    lse = torch.where(has, m + torch.log(den_safe), torch.zeros_like(den))[..., 0]
    return o, lse


def ref_window_attention(q, k, v, pq, pk, pv, token_mask, gh, gw, w, layout, scale):
    """Returns (o, prefix_o or None, lse (B*nW, H, S))."""
    B, L, H, D = q.shape
    qw, kw, vw = (_windows(t, gh, gw, w, layout) for t in (q, k, v))  # (B, nW, H, N, D)
    nW = qw.shape[1]
    if token_mask is not None:
        valid = _windows(token_mask[:, :, None].expand(B, L, H), gh, gw, w, layout)  # (B, nW, H, N)
    else:
        valid = torch.ones(qw.shape[:-1], dtype=torch.bool)
    if pq is not None:
        qw, kw, vw = (torch.cat([p[:, :, :, None], t], dim=3) for p, t in ((pq, qw), (pk, kw), (pv, vw)))
        valid = torch.cat([torch.ones_like(valid[..., :1]), valid], dim=-1)
    o, lse = _masked_attention(qw, kw, vw, valid[:, :, :, None, :], scale)
    lse = lse.reshape(B * nW, H, -1)
    if pq is not None:
        return _unwindows(o[:, :, :, 1:], gh, gw, w, layout), o[:, :, :, 0], lse
    return _unwindows(o, gh, gw, w, layout), None, lse


def ref_cls_pool(cq, ck, cv, k, v, gh, gw, w, layout, scale):
    B, nW, H, D = cq.shape
    kw, vw = (_windows(t, gh, gw, w, layout) for t in (k, v))
    kw = torch.cat([ck[:, :, :, None], kw], dim=3)
    vw = torch.cat([cv[:, :, :, None], vw], dim=3)
    valid = torch.ones(kw.shape[:-1], dtype=torch.bool)[:, :, :, None, :]
    o, lse = _masked_attention(cq[:, :, :, None], kw, vw, valid, scale)
    return o[:, :, :, 0], lse.reshape(B * nW, H, 1)


# ---------------------------------------------------------------------------------------------- helpers


def _grads(fn, inputs, outs_idx, gouts):
    """Forward ``fn`` on leaf copies of ``inputs``; returns (outputs, grads of every input)."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
    outs = fn(*leaves)
    pairs = [(outs[i], g) for i, g in zip(outs_idx, gouts) if g is not None]
    req = [x for x in leaves if x is not None]
    gs = torch.autograd.grad([o for o, _ in pairs], req, [g for _, g in pairs], allow_unused=True)
    it = iter(gs)
    grads = [(next(it) if x is not None else None) for x in leaves]
    grads = [torch.zeros_like(x) if g is None and x is not None else g for g, x in zip(grads, leaves)]
    return [o.detach() if o is not None else None for o in outs], grads


def _check(name, got, exact, *lows):
    """``got`` (kernel), ``exact`` (float64), ``lows`` (the same computation in the low precision)."""
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    assert torch.isfinite(got.float()).all(), name
    err = (got.double() - exact).abs().max().item()
    base = max((low.double() - exact).abs().max().item() for low in lows)
    tol = 2 * base + ULP[got.dtype if got.dtype in ULP else torch.float32] * exact.abs().max().item()
    assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (plain low-precision err {base:.3e})"


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _windows_from_grid(x, gh, gw, w, sel):
    """Gather the windows ``sel`` of a grid-layout tensor into the 'windows' layout."""
    xw = _windows(x, gh, gw, w, "grid")[:, sel]  # (B, K, H, N, D)
    return xw.permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, *x.shape[2:])


# ---------------------------------------------------------------------------------------------- window attention

# (B, gh, gw, w, H, D, dtype, prefix, layout, mask, sel) ; sel: windows gathered ("all", "one", list)
CASES = [
    (1, 8, 8, 4, 2, 64, torch.bfloat16, True, "grid", False, None),
    (2, 8, 12, 4, 3, 76, torch.float32, True, "grid", True, None),
    (2, 8, 8, 4, 2, 80, torch.bfloat16, False, "grid", True, None),
    (1, 8, 12, 4, 2, 80, torch.bfloat16, True, "windows", False, [5, 0, 3]),
    (2, 8, 8, 4, 2, 64, torch.float16, False, "windows", False, "one"),
    (1, 8, 8, 4, 2, 16, torch.float32, True, "windows", False, "all"),
    (1, 4, 6, 2, 2, 16, torch.float32, True, "grid", True, None),
    (1, 4, 4, 2, 1, 64, torch.bfloat16, False, "windows", False, "all"),
    (1, 4, 6, 2, 2, 76, torch.bfloat16, True, "grid", False, None),
    (1, 8, 16, 8, 1, 16, torch.bfloat16, True, "grid", False, None),
    (1, 16, 8, 8, 1, 64, torch.float32, False, "windows", False, [1, 0]),
    (1, 8, 8, 8, 2, 16, torch.float32, False, "grid", True, None),
]


def _make_case(B, gh, gw, w, H, D, dtype, prefix, layout, mask, sel, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nWg = (gh // w) * (gw // w)
    q, k, v = (_rand((B, gh * gw, H, D), torch.float64, gen) for _ in range(3))
    if layout == "windows":
        idx = list(range(nWg)) if sel in (None, "all") else [nWg - 1] if sel == "one" else sel
        q, k, v = (_windows_from_grid(t, gh, gw, w, idx) for t in (q, k, v))
    nW = q.shape[1] // (w * w)
    pq = pk = pv = None
    if prefix:
        pq, pk, pv = (_rand((B, nW, H, D), torch.float64, gen) for _ in range(3))
    tm = None
    if mask:
        tm = torch.rand((B, gh * gw), generator=gen) > 0.4
        # one window with every token masked (with a prefix only the prefix key remains)
        tm.view(B, gh // w, w, gw // w, w)[0, 0, :, 0, :] = False
    cast = (lambda t: None if t is None else t.to(dtype))
    return [cast(t) for t in (q, k, v, pq, pk, pv)], tm, nW


def _window_case(B, gh, gw, w, H, D, dtype, prefix, layout, mask, sel, drop_dpo=False):
    (q, k, v, pq, pk, pv), tm, nW = _make_case(B, gh, gw, w, H, D, dtype, prefix, layout, mask, sel)
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(1)
    do = _rand(q.shape, dtype, gen)
    dpo = _rand(pq.shape, dtype, gen) if prefix and not drop_dpo else None

    o, po, lse = K.window_attention_fwd(q, k, v, pq, pk, pv, tm, gh, gw, w, layout, scale)
    grads = K.window_attention_bwd(do, dpo, q, k, v, pq, pk, pv, tm, o, po, lse, gh, gw, w, layout, scale)

    def ref(lowp):
        cast = (lambda t: None if t is None else (t.to(dtype) if lowp else t.double()))
        fn = lambda *a: ref_window_attention(*a, tm, gh, gw, w, layout, scale)  # noqa: E731
        return _grads(fn, [cast(t) for t in (q, k, v, pq, pk, pv)], (0, 1), (cast(do), cast(dpo)))

    (eo, epo, else_), eg = ref(False)
    (lo, lpo, llse), lg = ref(True)
    args = (q, k, v, pq, pk, pv, tm, gh, gw, w, layout, scale)
    with use_backend("reference"):
        ro, rpo, rlse = torch.ops.sapiens2.window_attention(*args)
        rg = torch.ops.sapiens2.window_attention_backward(do, dpo, q, k, v, pq, pk, pv, tm, ro, rpo, rlse,
                                                          gh, gw, w, layout, scale)
    _check("o", o, eo, lo, ro)
    _check("lse", lse, else_, llse.float(), rlse)
    assert lse.dtype == torch.float32
    if prefix:
        _check("prefix_o", po, epo, lpo, rpo)
    else:
        assert po.numel() == 0
    names = ("dq", "dk", "dv", "dprefix_q", "dprefix_k", "dprefix_v")
    for name, g, e, lw, r in zip(names, grads, eg, lg, rg):
        if e is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == dtype, name
        _check(name, g, e, lw, r)
    if mask and not prefix:  # the fully masked window: o = 0, lse = 0, zero gradients
        win0 = _windows(o, gh, gw, w, "grid")[0, 0]
        assert (win0 == 0).all() and (lse[0] == 0).all()
        assert (_windows(grads[0], gh, gw, w, "grid")[0, 0] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "w{3}_D{5}_{6}_{8}_p{7:d}_m{9:d}".format(*c).replace("torch.", ""))
def test_window_attention(case):
    _window_case(*case)


def test_window_attention_without_dprefix_o():
    _window_case(1, 8, 8, 4, 2, 64, torch.float32, True, "grid", False, None, drop_dpo=True)


def test_matches_reference_op_contract():
    """Same shapes, dtypes and (to rounding) values as the custom ops' reference implementations."""
    for prefix in (True, False):
        (q, k, v, pq, pk, pv), tm, nW = _make_case(2, 8, 8, 4, 2, 16, torch.float32, prefix, "grid", True, None)
        args = (q, k, v, pq, pk, pv, tm, 8, 8, 4, "grid", 0.25)
        with use_backend("reference"):
            ref = torch.ops.sapiens2.window_attention(*args)
        got = K.window_attention_fwd(*args)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        do = torch.randn_like(q)
        dpo = torch.randn_like(pq) if prefix else None
        with use_backend("reference"):
            rg = torch.ops.sapiens2.window_attention_backward(do, dpo, q, k, v, pq, pk, pv, tm, *ref, 8, 8, 4, "grid", 0.25)
        gg = K.window_attention_bwd(do, dpo, q, k, v, pq, pk, pv, tm, *got, 8, 8, 4, "grid", 0.25)
        for a, b in zip(gg, rg):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (q, k, v, cq, ck, cv), _, nW = _make_case(1, 8, 8, 4, 2, 16, torch.float32, True, "windows", False, [2, 1])
    args = (cq, ck, cv, k, v, 8, 8, 4, "windows", 0.25)
    with use_backend("reference"):
        ref = torch.ops.sapiens2.cls_pool(*args)
        do = torch.randn_like(cq)
        rg = torch.ops.sapiens2.cls_pool_backward(do, cq, ck, cv, k, v, *ref, 8, 8, 4, "windows", 0.25)
    got = K.cls_pool_fwd(*args)
    gg = K.cls_pool_bwd(do, cq, ck, cv, k, v, *got, 8, 8, 4, "windows", 0.25)
    for a, b in zip((*got, *gg), (*ref, *rg)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- cls_pool

CLS_CASES = [
    (2, 8, 8, 4, 2, 64, torch.bfloat16, "grid", None),
    (1, 8, 12, 4, 2, 76, torch.float32, "windows", [4, 1, 2]),
    (1, 8, 8, 4, 3, 80, torch.bfloat16, "windows", "one"),
    (1, 4, 6, 2, 2, 16, torch.float32, "grid", None),
    (1, 8, 16, 8, 1, 64, torch.float16, "windows", "all"),
]


@pytest.mark.parametrize("case", CLS_CASES, ids=lambda c: "w{3}_D{5}_{6}_{7}".format(*c).replace("torch.", ""))
def test_cls_pool(case):
    B, gh, gw, w, H, D, dtype, layout, sel = case
    (_, k, v, cq, ck, cv), _, nW = _make_case(B, gh, gw, w, H, D, dtype, True, layout, False, sel, seed=3)
    scale = D ** -0.5
    do = _rand(cq.shape, dtype, torch.Generator().manual_seed(4))
    o, lse = K.cls_pool_fwd(cq, ck, cv, k, v, gh, gw, w, layout, scale)
    grads = K.cls_pool_bwd(do, cq, ck, cv, k, v, o, lse, gh, gw, w, layout, scale)

    def ref(lowp):
        cast = (lambda t: t.to(dtype) if lowp else t.double())
        fn = lambda *a: ref_cls_pool(*a, gh, gw, w, layout, scale)  # noqa: E731
        return _grads(fn, [cast(t) for t in (cq, ck, cv, k, v)], (0,), (cast(do),))

    (eo, else_), eg = ref(False)
    (lo, llse), lg = ref(True)
    with use_backend("reference"):
        ro, rlse = torch.ops.sapiens2.cls_pool(cq, ck, cv, k, v, gh, gw, w, layout, scale)
        rg = torch.ops.sapiens2.cls_pool_backward(do, cq, ck, cv, k, v, ro, rlse, gh, gw, w, layout, scale)
    assert o.shape == (B, nW, H, D) and lse.shape == (B * nW, H, 1) and lse.dtype == torch.float32
    _check("o", o, eo, lo, ro)
    _check("lse", lse, else_, llse.float(), rlse)
    for name, g, e, lw, r in zip(("dcls_q", "dcls_k", "dcls_v", "dk", "dv"), grads, eg, lg, rg):
        assert g.dtype == dtype
        _check(name, g, e, lw, r)


# ---------------------------------------------------------------------------------------------- real size


@pytest.mark.slow
def test_real_size_bf16():
    """Grid 64x48 patches, w=4 (192 windows), 2 heads, D=64, bf16, with the CLS prefix; then cls_pool."""
    _window_case(1, 64, 48, 4, 2, 64, torch.bfloat16, True, "grid", False, None)
    test_cls_pool((1, 64, 48, 4, 2, 64, torch.bfloat16, "grid", None))


# ---------------------------------------------------------------------------------------------- AOT gate

_AOT = textwrap.dedent(
    """
    import glob, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from sapiens2.kernels.window_attention import SHIPPED_CONFIGS
    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))
    for c in SHIPPED_CONFIGS:
        k = triton.compile(
            triton.compiler.ASTSource(fn=c["fn"], signature=c["signature"], constexprs=c["constexprs"]),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
        regs = local = -1
        if tools:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                r = subprocess.run([tools[0], "-res-usage", f.name], capture_output=True, text=True).stdout
            regs = int(re.search(r"REG:(\\d+)", r).group(1))
            local = int(re.search(r"LOCAL:(\\d+)", r).group(1)) + int(re.search(r"STACK:(\\d+)", r).group(1))
        print(c["name"], regs, local, k.metadata.shared, flush=True)
    """
)


@pytest.mark.slow
def test_shipped_configs_compile_sm90a():
    names = [c["name"] for c in K.SHIPPED_CONFIGS]
    assert len(names) == len(set(names))
    kinds = {n.split("_bf16")[0].split("_fp16")[0] for n in names}
    assert kinds == {"window_attn_fwd_prefix", "window_attn_bwd_prefix", "window_attn_bwd_prefix_bias", "cls_pool_fwd",
                     "cls_pool_bwd"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    assert [row[0] for row in rows] == names
    for name, regs, local, shared in rows:
        assert int(local) <= 0, f"{name}: {local} bytes of local memory (spills)"
        assert int(regs) <= 255, name
        assert int(shared) <= 227 * 1024, name
