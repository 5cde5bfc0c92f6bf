"""The reference backend of every op against independent float64 definitions, forward and backward,
plus ``torch.library.opcheck`` on every custom op and the bad-input errors."""

import pytest
import torch

import plain_reference as plain
import sapiens2.ops as ops

torch.manual_seed(0)
f64 = dict(dtype=torch.float64)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, **f64) * scale).requires_grad_()


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), **f64)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _assert_close(a, b, tol=1e-10):
    assert a is not None and b is not None
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def _compare(ours, theirs, inputs):
    _assert_close(ours, theirs)
    for ga, gb in zip(_grads(ours, inputs), _grads(theirs, inputs)):
        _assert_close(ga, gb)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 100), (2, 768)])
def test_rms_norm(shape):
    x, w = _leaf(*shape), _leaf(shape[-1])
    _compare(ops.rms_norm(x, w), plain.rms_norm(x, w), (x, w))


@pytest.mark.parametrize("with_scale", [True, False])
def test_add_rms_norm(with_scale):
    x, r, w = _leaf(2, 5, 96), _leaf(2, 5, 96), _leaf(96)
    s = _leaf(96) if with_scale else None
    y, h = ops.rms_norm(x, w, residual=r, x_scale=s)
    h_ref = r + (x * s if with_scale else x)
    y_ref = plain.rms_norm(h_ref, w)
    inputs = (x, r, w) + ((s,) if with_scale else ())
    # both outputs carry gradient: the norm output and the residual stream
    ours = torch.cat([y.flatten(), h.flatten()])
    theirs = torch.cat([y_ref.flatten(), h_ref.flatten()])
    _compare(ours, theirs, inputs)


@pytest.mark.parametrize("shape", [(1, 2), (4, 3, 2 * 77), (2, 2 * 3072)])
def test_swiglu(shape):
    x = _leaf(*shape)
    _compare(ops.swiglu(x), plain.swiglu(x), (x,))


def _rope_tables(B, N, p, D, per_sample):
    n = (B, N - p, D) if per_sample else (N - p, D)
    ang = torch.rand(*n, **f64) * 6.28
    return torch.sin(ang), torch.cos(ang)


@pytest.mark.parametrize("D,p,per_sample", [(64, 9, False), (76, 0, True), (80, 1, False)])
def test_qk_norm_rope(D, p, per_sample):
    B, N = 2, 13
    q, k = _leaf(B, N, 4, D), _leaf(B, N, 2, D)
    qw, kw = _leaf(D), _leaf(D)
    sin, cos = _rope_tables(B, N, p, D, per_sample)
    qo, ko = ops.qk_norm_rope(q, k, qw, kw, sin, cos, p)
    qr, kr = plain.rope(plain.rms_norm(q, qw), sin, cos, p), plain.rope(plain.rms_norm(k, kw), sin, cos, p)
    _compare(torch.cat([qo.flatten(), ko.flatten()]), torch.cat([qr.flatten(), kr.flatten()]), (q, k, qw, kw))


@pytest.mark.parametrize(
    "H,Hkv,D,norm,rope,p,lens",
    [
        (4, 4, 64, False, False, 0, None),
        (4, 2, 76, True, True, 9, None),
        (2, 1, 80, True, False, 0, [1, 17]),
        (4, 2, 64, False, True, 3, [17, 5]),
    ],
)
def test_attention(H, Hkv, D, norm, rope, p, lens):
    B, N = 2, 17
    q, k, v = _leaf(B, N, H, D), _leaf(B, N, Hkv, D), _leaf(B, N, Hkv, D)
    qw, kw = (_leaf(D), _leaf(D)) if norm else (None, None)
    sin, cos = _rope_tables(B, N, p, D, per_sample=True) if rope else (None, None)
    seq_lens = torch.tensor(lens) if lens else None
    o = ops.attention(q, k, v, q_norm_weight=qw, k_norm_weight=kw, rope=(sin, cos) if rope else None,
                      num_prefix_tokens=p, seq_lens=seq_lens)
    ref = plain.attention(q, k, v, qw, kw, sin, cos, p, seq_lens)
    inputs = tuple(t for t in (q, k, v, qw, kw) if t is not None)
    _compare(o, ref, inputs)


@pytest.mark.parametrize("w,prefix,masked", [(4, True, False), (2, False, True), (8, True, True)])
def test_window_attention_grid(w, prefix, masked):
    B, gh, gw, H, D = 2, 2 * w, 3 * w if w < 8 else w, 2, 16
    q, k, v = _leaf(B, gh * gw, H, D), _leaf(B, gh * gw, H, D), _leaf(B, gh * gw, H, D)
    nW = (gh // w) * (gw // w)
    pre = (_leaf(B, nW, H, D), _leaf(B, nW, H, D), _leaf(B, nW, H, D)) if prefix else (None, None, None)
    tm = (torch.rand(B, gh * gw) > 0.3) if masked else None
    out = ops.window_attention(q, k, v, (gh, gw), w, *pre, token_mask=tm)
    ref = plain.window_attention(q, k, v, gh, gw, w, *pre, token_mask=tm)
    inputs = (q, k, v) + (pre if prefix else ())
    if prefix:
        out, ref = torch.cat([out[0].flatten(), out[1].flatten()]), torch.cat([ref[0].flatten(), ref[1].flatten()])
    _compare(out, ref, inputs)


@pytest.mark.parametrize("K", [1, 3, 6])
def test_window_attention_windows_layout_matches_grid_subset(K):
    """Gathered windows give what those windows give in the full grid (windows don't interact)."""
    B, w, gh, gw, H, D = 2, 4, 8, 12, 2, 8
    nW = 6
    q, k, v = (torch.randn(B, gh * gw, H, D, **f64) for _ in range(3))
    pre = tuple(torch.randn(B, nW, H, D, **f64) for _ in range(3))
    full, full_pre = ops.window_attention(q, k, v, (gh, gw), w, *pre)
    idx = torch.stack([torch.randperm(nW)[:K].sort().values for _ in range(B)])

    def gather(t):  # grid -> (B, K*w*w, H, D) window-major
        win = plain.windows(t, gh, gw, w)
        return torch.gather(win, 1, idx[:, :, None, None, None].expand(-1, -1, *win.shape[2:])).flatten(1, 2)

    def gpre(t):
        return torch.gather(t, 1, idx[:, :, None, None].expand(-1, -1, H, D))

    out, out_pre = ops.window_attention(gather(q), gather(k), gather(v), (gh, gw), w,
                                        gpre(pre[0]), gpre(pre[1]), gpre(pre[2]), layout="windows")
    _assert_close(out, gather(full))
    _assert_close(out_pre, gpre(full_pre))


@pytest.mark.parametrize("layout", ["grid", "windows"])
def test_cls_pool(layout):
    B, w, gh, gw, H, D = 2, 4, 8, 4, 3, 16
    nW = 2
    cq, ck, cv = _leaf(B, nW, H, D), _leaf(B, nW, H, D), _leaf(B, nW, H, D)
    k, v = _leaf(B, gh * gw, H, D), _leaf(B, gh * gw, H, D)
    out = ops.cls_pool(cq, ck, cv, k, v, (gh, gw), w, layout=layout)
    if layout == "windows":  # interpret the same memory as two gathered windows
        kk, vv = (plain.unwindows(t.reshape(B, nW, w * w, H, D), gh, gw, w) for t in (k, v))
    else:
        kk, vv = k, v
    _, ref = plain.window_attention(torch.zeros_like(kk), kk, vv, gh, gw, w, cq, ck, cv)
    _compare(out, ref, (cq, ck, cv, k, v))


# -------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    r = lambda *s: torch.randn(*s)  # noqa: E731
    g = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    sin, cos = r(7, 16), r(7, 16)
    return [
        ("rms_norm", (g(3, 5, 32), g(32), 1e-6)),
        ("rms_norm_backward", (r(3, 32), r(3, 32), r(32), r(3).abs())),
        ("add_rms_norm", (g(3, 32), g(3, 32), g(32), g(32), 1e-6)),
        ("add_rms_norm", (g(3, 32), g(3, 32), None, g(32), 1e-6)),
        ("add_rms_norm_backward", (r(3, 32), r(3, 32), r(3, 32), r(3, 32), r(32), r(32), r(3).abs())),
        ("swiglu", (g(4, 2, 24),)),
        ("swiglu_backward", (r(4, 12), r(4, 24))),
        ("swiglu_recompute_backward", (r(4, 12), r(4, 24), True)),
        ("swiglu_recompute_backward", (r(3, 2, 12), r(3, 2, 24), False)),
        ("qk_norm_rope", (g(2, 9, 4, 16), g(2, 9, 2, 16), g(16), g(16), sin, cos, 2, 1e-6)),
        ("qk_norm_rope_backward", (r(2, 9, 4, 16), r(2, 9, 2, 16), r(2, 9, 4, 16), r(2, 9, 2, 16), r(16), r(16),
                                   sin, cos, r(2, 9, 4).abs(), r(2, 9, 2).abs(), 2)),
        ("attention", (g(2, 9, 4, 16), g(2, 9, 2, 16), g(2, 9, 2, 16), g(16), g(16), sin, cos, 2,
                       torch.tensor([9, 4]), 0.25, 1e-6)),
        ("attention", (g(1, 5, 2, 8), g(1, 5, 2, 8), g(1, 5, 2, 8), None, None, None, None, 0, None, 0.3, 1e-6)),
        ("window_attention", (g(2, 32, 2, 8), g(2, 32, 2, 8), g(2, 32, 2, 8), g(2, 2, 2, 8), g(2, 2, 2, 8),
                              g(2, 2, 2, 8), None, 4, 8, 4, "grid", 0.3)),
        ("window_attention", (g(1, 16, 2, 8), g(1, 16, 2, 8), g(1, 16, 2, 8), None, None, None,
                              torch.rand(1, 16) > 0.2, 4, 4, 2, "grid", 0.3)),
        ("cls_pool", (g(2, 2, 2, 8), g(2, 2, 2, 8), g(2, 2, 2, 8), g(2, 32, 2, 8), g(2, 32, 2, 8), 8, 4, 4,
                      "windows", 0.3)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sapiens2, name).default, args)


def test_flop_counter_sees_attention():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 9, 4, 16, requires_grad=True)
    k = torch.randn(2, 9, 2, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        ops.attention(q, k, k).sum().backward()
    assert fc.get_total_flops() == 4 * 2 * 4 * 9 * 9 * 16 * (1 + 2.5)


def test_meta_device_runs_every_op():
    m = dict(device="meta")
    q, k = torch.empty(2, 9, 4, 16, **m, requires_grad=True), torch.empty(2, 9, 2, 16, **m, requires_grad=True)
    w = torch.empty(16, **m, requires_grad=True)
    sin = torch.empty(7, 16, **m)
    qo, ko = ops.qk_norm_rope(q, k, w, w, sin, sin, 2)
    o = ops.attention(qo, ko, ko)
    y = ops.swiglu(ops.rms_norm(o, w))
    y.sum().backward()
    assert q.grad.shape == q.shape and w.grad.shape == w.shape


# -------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="floating"):
        ops.rms_norm(torch.ones(3, 8, dtype=torch.int32), torch.randn(8))
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.rms_norm(x, torch.randn(8), residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(3, 7))
    q, k = torch.randn(1, 5, 3, 8), torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="multiple of k heads"):
        ops.attention(q, k, k)
    with pytest.raises(ValueError, match="D=8"):
        ops.attention(q, torch.randn(1, 5, 3, 4), torch.randn(1, 5, 3, 4))
    with pytest.raises(ValueError, match="sin must have shape"):
        ops.attention(q, q, q, rope=(torch.randn(4, 8), torch.randn(4, 8)), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="seq_lens must be in"):
        ops.attention(q, q, q, seq_lens=torch.tensor([0]))
    with pytest.raises(TypeError, match="share one dtype"):
        ops.attention(q, q.double(), q)
    g = torch.randn(1, 6 * 6, 2, 8)
    with pytest.raises(ValueError, match="divisible by window 4"):
        ops.window_attention(g, g, g, (6, 6), 4)
    with pytest.raises(ValueError, match="layout must be"):
        ops.window_attention(g, g, g, (6, 6), 3, layout="rows")
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("tpu"):
            pass


def test_swiglu_ffn_matches_composition_and_keeps_no_hidden_activation():
    x, w12, b12, w3, b3 = _leaf(2, 5, 16), _leaf(48, 16), _leaf(48), _leaf(16, 24), _leaf(16)
    out = ops.swiglu_ffn(x, w12, b12, w3, b3)
    ref = plain.swiglu(x @ w12.t() + b12) @ w3.t() + b3
    _compare(out, ref, (x, w12, b12, w3, b3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu_ffn(x, w12, b12, w3, b3)
    assert {tuple(t.shape) for t in saved} == {(2, 5, 16), (2, 5, 48), (48, 16), (16, 24)}  # no (2, 5, 24)
    with pytest.raises(ValueError, match="w3 must be"):
        ops.swiglu_ffn(x, w12, b12, _leaf(16, 23), b3)
    with pytest.raises(ValueError, match="w12 must be"):
        ops.swiglu_ffn(x, _leaf(48, 15), b12, w3, b3)


def test_cls_pool_single_gathered_window_backward():
    """One gathered window: the reference's views must not make outputs alias each other."""
    cq, ck, cv = _leaf(2, 1, 2, 8), _leaf(2, 1, 2, 8), _leaf(2, 1, 2, 8)
    k, v = _leaf(2, 16, 2, 8), _leaf(2, 16, 2, 8)
    out = ops.cls_pool(cq, ck, cv, k, v, (8, 8), 4, layout="windows")
    torch.autograd.grad(out.sum(), (cq, ck, cv, k, v))
