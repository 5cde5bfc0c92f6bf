"""Triton flash attention (``sapiens2.kernels.attention``) under the Triton interpreter, CPU tensors.

Forward (o, lse) and every gradient (q, k, v, both norm weights) against a float64 plain-torch
reference (norm, RoPE, GQA by explicit ``repeat_interleave`` head mapping, masked softmax; gradients
by autograd). Tolerance: the kernel's max-abs error vs float64 must be at most twice the error of
the same plain-torch computation run in the low precision, plus one ulp of the output dtype
scaled by the largest float64 magnitude.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / sapiens2 are imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sapiens2.kernels import attention as A  # noqa: E402

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


# ----------------------------------------------------------------------------------------------
# plain-torch reference (runs in whatever dtype its inputs have)


def _rot(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _prologue(x, w, sin, cos, p, eps):
    if w is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    if sin is not None:
        s = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
        c = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]
        x = torch.cat([x[:, :p], x[:, p:] * c + _rot(x[:, p:]) * s], dim=1)
    return x


def plain_attention(q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps):
    """(o (B, N, H, D), lse (B, H, N)) in the inputs' dtype."""
    B, N, H, D = q.shape
    G = H // k.shape[2]
    q = _prologue(q, qw, sin, cos, p, eps)
    k = _prologue(k, kw, sin, cos, p, eps)
    kx = k.repeat_interleave(G, dim=2)  # query head h -> kv head h // G
    vx = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bnhd,bmhd->bhnm", q, kx) * scale
    if seq_lens is not None:
        keep = torch.arange(N)[None, :] < seq_lens[:, None]  # (B, N)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, dim=-1), vx)
    if seq_lens is not None:
        o = o * keep[:, :, None, None]
        lse = lse * keep[:, None, :]
    return o, lse


# ----------------------------------------------------------------------------------------------
# checks


def _check(name, got, ref64, low, out_dtype, zero_scale=1.0, ulps=1):
    """``low``: the same computation in the low precision, or several forms of it (then the largest
    error counts: plain autograd, and the op's reference backward that recomputes P from the saved
    lse as the kernel does)."""
    lows = [t.double() for t in (low if isinstance(low, (tuple, list)) else (low,))]
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item() if ref64.numel() else 0.0
    base = max((lo - ref64).abs().max().item() for lo in lows) if ref64.numel() else 0.0
    mag = ref64.abs().max().item() if ref64.numel() else 0.0
    # An identically zero float64 result is pure cancellation (dq, dk with a single key: the softmax
    # of one score is constant, dP - delta = 0); its ulp term is then taken at the scale of the
    # cancelling terms, ``zero_scale``.
    tol = 2 * base + ulps * ULP[out_dtype] * (mag if mag > 0 else zero_scale)
    assert err <= tol, f"{name}: max-abs error {err:.3e} > tol {tol:.3e} (plain torch low precision: {base:.3e})"


def _check_per_sample(name, got, ref64, low, out_dtype, lengths, zero_scale=1.0):
    """The rule per batch sample: the samples are independent problems, and one of length 1 has
    cancellation-zero dq/dk that must not borrow the other samples' magnitude.

    A length-1 sample is a one-element softmax, exactly 1 in plain torch (zero error to double);
    the kernel recomputes P = exp(S - lse) from the saved fp32 lse, whose rounding (a few ulp of
    P) is then the whole error: such samples get 4 ulp instead of 1."""
    for b in range(got.shape[0]):
        ulps = 4 if lengths[b] == 1 else 1
        lows = [t[b] for t in low] if isinstance(low, (tuple, list)) else low[b]
        _check(f"{name}[sample {b}]", got[b], ref64[b], lows, out_dtype, zero_scale, ulps)


def _inputs(B, N, H, Hkv, D, dtype, norm, rope, p, lens, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).to(dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    qw = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype) if norm else None
    kw = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype) if norm else None
    sin = cos = None
    if rope:
        shape = (B, N - p, D) if per_sample else (N - p, D)
        ang = torch.rand(shape, generator=g) * 2 * math.pi
        sin, cos = ang.sin(), ang.cos()  # float32 tables (the kernel's RoPE is fp32)
    seq_lens = None
    if lens:
        seq_lens = torch.tensor([N, 1, max(1, (2 * N) // 3)][:B], dtype=torch.int64)
        if B > 3:
            seq_lens = torch.cat([seq_lens, torch.full((B - 3,), N)])
    do = torch.randn(B, N, H, D, generator=g).to(dtype)
    return q, k, v, qw, kw, sin, cos, seq_lens, do


def run_case(B, N, H, Hkv, D, dtype, norm=False, rope=False, p=0, lens=False, per_sample=False, seed=0,
             backward=True, deterministic=False):
    q, k, v, qw, kw, sin, cos, seq_lens, do = _inputs(B, N, H, Hkv, D, dtype, norm, rope, p, lens, per_sample, seed)
    scale, eps = 1.0 / math.sqrt(D), 1e-6

    o, lse = A.attention_fwd(q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32

    def leaves(cast):
        ts = [q, k, v, qw, kw]
        return [None if t is None else t.detach().to(cast).requires_grad_(True) for t in ts]

    def table(t, cast):
        return None if t is None else t.to(cast)

    l64, llo = leaves(torch.float64), leaves(dtype)
    o64, lse64 = plain_attention(*l64, table(sin, torch.float64), table(cos, torch.float64), p, seq_lens, scale, eps)
    olo, lselo = plain_attention(*llo, table(sin, dtype), table(cos, dtype), p, seq_lens, scale, eps)
    lengths = [N] * B if seq_lens is None else seq_lens.tolist()
    _check_per_sample("o", o, o64.detach(), olo.detach(), dtype, lengths)
    _check_per_sample("lse", lse, lse64.detach(), lselo.detach(), torch.float32, lengths)
    if seq_lens is not None:  # rows past the valid length: exactly zero
        for b in range(B):
            assert (o[b, seq_lens[b]:] == 0).all() and (lse[b, :, seq_lens[b]:] == 0).all()
    if not backward:
        return

    grads = A.attention_bwd(do, q, k, v, o, lse, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic)
    (o64 * do.double()).sum().backward()
    (olo * do).sum().backward()
    # the op's reference backward in the low precision: P recomputed from the saved lse, as the kernel
    from sapiens2.ops.attention import _attention_bwd_ref, _attention_ref

    ro, rlse = _attention_ref(q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps)
    rgrads = _attention_bwd_ref(do, q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps, ro, rlse)
    names = ["dq", "dk", "dv", "dq_norm_weight", "dk_norm_weight"]
    for name, got, a64, alo, ref, rg in zip(names, grads, l64, llo, [q, k, v, qw, kw], rgrads):
        if ref is None:
            assert got.numel() == 0, name
            continue
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        # |dP| <= D max|dO| max|V| bounds the terms that cancel in dS = P (dP - delta)
        zero_scale = D * do.abs().max().item() * v.abs().max().item()
        lows = (alo.grad, rg.to(alo.grad.dtype))
        if a64.grad.dim() == 1:  # norm weights: summed over the batch
            _check(name, got, a64.grad, lows, dtype, zero_scale)
        else:
            _check_per_sample(name, got, a64.grad, lows, dtype, lengths, zero_scale)
    if seq_lens is not None:
        for b in range(B):
            assert (grads[0][b, seq_lens[b]:] == 0).all()  # no gradient into padded query rows
            assert (grads[1][b, seq_lens[b]:] == 0).all() and (grads[2][b, seq_lens[b]:] == 0).all()


# ----------------------------------------------------------------------------------------------
# grid (interpreter budget): B, N, H, Hkv, D, dtype, norm, rope, p, lens, per_sample

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    # plain attention, each head dim, both GQA ratios
    (2, 77, 2, 2, 64, F32, False, False, 0, False, False),
    (2, 77, 4, 2, 76, F32, False, False, 0, True, False),
    (3, 200, 2, 1, 80, F32, False, False, 0, True, False),
    (2, 200, 2, 2, 64, BF16, False, False, 0, True, False),
    (2, 77, 4, 2, 80, BF16, False, False, 0, False, False),
    # norm only / RoPE only / both, prefix 0 and 9
    (2, 77, 2, 1, 64, F32, True, False, 0, True, False),
    (2, 77, 2, 2, 76, F32, False, True, 9, False, False),
    (3, 77, 4, 2, 80, F32, True, True, 9, True, False),
    (2, 200, 2, 1, 76, F32, True, True, 0, False, True),
    (2, 77, 2, 2, 64, BF16, True, True, 9, True, True),
    (2, 200, 4, 2, 76, BF16, True, True, 9, True, False),
    (2, 77, 2, 1, 80, BF16, False, True, 0, True, False),
    (2, 77, 2, 1, 80, BF16, True, False, 9, False, False),
    # tiny and ragged N (N = 1: a single token; N = 17 < every block)
    (2, 1, 2, 1, 64, F32, True, True, 0, True, False),
    (2, 1, 2, 2, 80, BF16, False, False, 0, False, False),
    (3, 17, 4, 2, 76, F32, True, True, 9, True, False),
    (2, 17, 2, 2, 80, BF16, True, True, 9, True, True),
    # fp16 once, head dim 128 once
    (2, 77, 4, 2, 80, F16, True, True, 9, True, False),
    (2, 77, 2, 1, 128, BF16, True, True, 9, True, False),
]


def _id(c):
    B, N, H, Hkv, D, dt, norm, rope, p, lens, ps = c
    dt = {F32: "fp32", BF16: "bf16", F16: "fp16"}[dt]
    return (f"B{B}-N{N}-H{H}kv{Hkv}-D{D}-{dt}" + ("-norm" if norm else "") + (f"-rope-p{p}" if rope else "")
            + ("-lens" if lens else "") + ("-persample" if ps else ""))


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_attention_fwd_bwd(case):
    B, N, H, Hkv, D, dtype, norm, rope, p, lens, ps = case
    run_case(B, N, H, Hkv, D, dtype, norm=norm, rope=rope, p=p, lens=lens, per_sample=ps)


# the deterministic backward (separate dQ kernel, no atomics): each head-dim tiling, prologue flags
DETERMINISTIC_CASES = [
    (2, 77, 4, 2, 64, F32, False, False, 0, True, False),
    (3, 77, 4, 2, 80, F32, True, True, 9, True, False),
    (2, 200, 4, 2, 76, BF16, True, True, 9, True, True),
    (2, 17, 2, 1, 80, BF16, True, False, 0, False, False),
    (2, 1, 2, 1, 64, F32, False, True, 0, True, False),
]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=[_id(c) for c in DETERMINISTIC_CASES])
def test_attention_bwd_deterministic(case):
    B, N, H, Hkv, D, dtype, norm, rope, p, lens, ps = case
    run_case(B, N, H, Hkv, D, dtype, norm=norm, rope=rope, p=p, lens=lens, per_sample=ps, deterministic=True)


def test_deterministic_and_atomic_paths_agree():
    """Both backward paths compute the same gradients (to fp32 summation order); the deterministic
    one is bitwise reproducible."""
    q, k, v, qw, kw, sin, cos, seq_lens, do = _inputs(2, 90, 4, 2, 80, F32, True, True, 9, True, False, 5)
    o, lse = A.attention_fwd(q, k, v, qw, kw, sin, cos, 9, seq_lens, 0.11, 1e-6)
    fast = A.attention_bwd(do, q, k, v, o, lse, qw, kw, sin, cos, 9, seq_lens, 0.11, 1e-6, False)
    det = A.attention_bwd(do, q, k, v, o, lse, qw, kw, sin, cos, 9, seq_lens, 0.11, 1e-6, True)
    det2 = A.attention_bwd(do, q, k, v, o, lse, qw, kw, sin, cos, 9, seq_lens, 0.11, 1e-6, True)
    for a, b, c in zip(fast, det, det2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)


def test_head_dim_below_tiles_rejected():
    with pytest.raises(ValueError, match="head dim 8 < 16"):
        A.attention_fwd(*_inputs(1, 8, 2, 2, 8, F32, False, False, 0, False, False, 0)[:7], 0, None, 0.3, 1e-6)


def test_matches_op_reference():
    """Same semantics as the contract's own reference (``sapiens2.ops.attention._attention_ref``)."""
    from sapiens2.ops.attention import _attention_bwd_ref, _attention_ref

    B, N, H, Hkv, D, p = 2, 40, 4, 2, 80, 9
    q, k, v, qw, kw, sin, cos, seq_lens, do = _inputs(B, N, H, Hkv, D, F32, True, True, p, True, True, 3)
    args = (q, k, v, qw, kw, sin, cos, p, seq_lens, 0.1, 1e-6)
    o, lse = A.attention_fwd(*args)
    o_r, lse_r = _attention_ref(*args)
    torch.testing.assert_close(o, o_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    got = A.attention_bwd(do, q, k, v, o, lse, qw, kw, sin, cos, p, seq_lens, 0.1, 1e-6)
    ref = _attention_bwd_ref(do, q, k, v, qw, kw, sin, cos, p, seq_lens, 0.1, 1e-6, o_r, lse_r)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4)


def test_head_dim_split():
    assert A._split_head_dim(64) == (64, 16, False)
    assert A._split_head_dim(128) == (128, 16, False)
    assert A._split_head_dim(76) == (64, 16, True)
    assert A._split_head_dim(80) == (64, 16, True)


def test_shipped_configs_format():
    names = set()
    for c in A.SHIPPED_CONFIGS:
        assert set(c) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        assert c["name"] not in names
        names.add(c["name"])
        assert hasattr(c["fn"], "arg_names")  # a @triton.jit function (interpreted here)
        assert list(c["signature"]) == c["fn"].arg_names
        for a, t in c["signature"].items():
            assert (t == "constexpr") == (a in c["constexprs"]), (c["name"], a)
    # every head dim x dtype has forward, backward and prologue kernels
    for dt in ("bf16", "fp16"):
        for D in (64, 76, 80, 128):
            for kind in ("attn_fwd", "attn_bwd_kv", "attn_bwd_dq", "attn_bwd_dq_finalize", "attn_bwd_prep", "norm_rope"):
                assert any(n.startswith(f"{kind}_{dt}_d{D}_") for n in names), (kind, dt, D)


# ----------------------------------------------------------------------------------------------
# full size (N = 3081 = 1 + 8 + 3072): one forward + backward per head dim


@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 76, 80])  # 128 is covered at N = 77; its full-length run adds 100 s
def test_attention_full_length(D):
    run_case(1, 3081, 1, 1, D, BF16, norm=True, rope=True, p=9, lens=False, seed=D)


_AOT_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
assert os.environ.get("TRITON_INTERPRET") != "1"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sapiens2.kernels.attention import SHIPPED_CONFIGS

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for c in SHIPPED_CONFIGS:
    if not re.search(sys.argv[1], c["name"]):
        continue
    k = triton.compile(ASTSource(fn=c["fn"], signature=c["signature"], constexprs=c["constexprs"],
                                 attrs=c.get("attrs")),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(k.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"), "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr + r.stdout)
    spills = int(st.group(1)) + int(st.group(2))
    wgmma = "wgmma.mma_async" in k.asm["ptx"]
    print(c["name"], spills, k.metadata.shared, int(wgmma))
"""


@pytest.mark.slow
def test_shipped_configs_compile_sm90a():
    """AOT compile (no interpreter, sm_90a) of the full-flag bf16 config of every kernel and head
    dim: no register spills, shared memory <= 227 KiB, and wgmma in the attention kernels."""
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pattern = r"_bf16_d\d+_norm1_rope1_parbf16(_lens1(_atomic[01])?)?(_bias1)?$"
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, pattern], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == 4 * 7, out.stdout
    for name, spills, shared, wgmma in rows:
        assert int(spills) == 0, (name, spills)
        assert int(shared) <= 227 * 1024, (name, shared)
        if name.startswith(("attn_fwd", "attn_bwd_kv")) or re.match(r"attn_bwd_dq_bf16", name):
            assert wgmma == "1", name


# ----------------------------------------------------------------------------------------------
# the packed op: q/k/v read from the slots of one projection output, one packed gradient


@pytest.mark.parametrize("norm_rope,lens,det", [(True, False, False), (False, True, False), (True, True, True)])
def test_attention_qkv_equals_unpacked(norm_rope, lens, det):
    """``attention_qkv`` on a packed (B, N, H + 2 Hkv, D) tensor is ``attention`` on its three slots,
    forward and backward, bit for bit on the Triton backend (same kernels, strided reads and writes)
    and on the reference backend; its gradient is one packed tensor."""
    import sapiens2.ops as ops

    B, N, H, Hkv, D, P = 2, 45, 4, 2, 80, 9
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, N, H + 2 * Hkv, D, generator=g).to(BF16)
    w = [(1 + 0.1 * torch.randn(D, generator=g)).to(BF16) for _ in range(2)] if norm_rope else [None, None]
    rope = tuple(torch.rand(2, N - P, D, generator=g).to(BF16)) if norm_rope else None
    seq_lens = torch.tensor([N, 30]) if lens else None
    do = torch.randn(B, N, H, D, generator=g).to(BF16)
    kw = dict(q_norm_weight=w[0], k_norm_weight=w[1], rope=rope, num_prefix_tokens=P if norm_rope else 0,
              seq_lens=seq_lens, deterministic=det)
    for backend in ("triton", "reference"):
        with ops.use_backend(backend, strict=backend == "triton"):
            a = qkv.clone().requires_grad_()
            o1 = ops.attention_qkv(a, H, **kw)
            (g1,) = torch.autograd.grad(o1, a, do)
            b = qkv.clone().requires_grad_()
            q, k, v = b.split([H, Hkv, Hkv], dim=2)
            o2 = ops.attention(q, k, v, **kw)
            (g2,) = torch.autograd.grad(o2, b, do)
        assert torch.equal(o1, o2) and torch.equal(g1, g2), backend
        assert g1.shape == qkv.shape and g1.is_contiguous()


@pytest.mark.parametrize("det", [False, True])
def test_attention_projected_bias_gradient(det):
    """The projected form (packed q/k/v GEMM + attention, the bias gradient from the attention kernels'
    partial sums) against float64 under the tolerance rule, with the plain composition (``F.linear``
    whose backward sums dqkv for the bias) as the low-precision reference."""
    import torch.nn.functional as F

    import sapiens2.ops as ops

    B, N, H, Hkv, D, P = 2, 45, 4, 2, 64, 9
    C = H * D
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, N, C, generator=g)
    w = torch.randn((H + 2 * Hkv) * D, C, generator=g) * C ** -0.5
    b = torch.randn((H + 2 * Hkv) * D, generator=g)
    qw, kw = 1 + 0.1 * torch.randn(D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)
    sin, cos = torch.rand(2, N - P, D, generator=g)
    do = torch.randn(B, N, H, D, generator=g)

    def run(dtype, projected):
        ts = [t.to(dtype).requires_grad_() for t in (x, w, b, qw, kw)]
        kw_ = dict(q_norm_weight=ts[3], k_norm_weight=ts[4], rope=(sin, cos), num_prefix_tokens=P, deterministic=det)
        if projected:
            o = ops.attention_projected(ts[0], ts[1], ts[2], H, **kw_)
        else:
            o = ops.attention_qkv(F.linear(ts[0], ts[1], ts[2]).view(B, N, H + 2 * Hkv, D), H, **kw_)
        return [o] + list(torch.autograd.grad(o, ts, do.to(dtype)))

    with ops.use_backend("reference"):
        exact = run(torch.float64, False)
        low = run(BF16, False)
    with ops.use_backend("triton", strict=True):
        got = run(BF16, True)
    for name, e, lo, gt in zip(["o", "dx", "dw", "db", "dqw", "dkw"], exact, low, got):
        _check(name, gt, e.double(), lo, BF16)
