"""The per-head QK-RMSNorm + 2D RoPE CUDA kernels (csrc/kernels/qk_norm_rope.cu) executed by the CPU
emulation: outputs, q/k gradients and both norm-weight gradients through the ``sapiens2`` ops on the
``"cuda"`` backend vs a float64 plain-torch reference under the tolerance rule (RoPE in fp32 as
the kernels compute it: fp32 tables); the global-memory traffic of each kernel (every input read
once, every output written once); thread-order independence; opcheck; errors."""

import pytest
import torch

from plain_reference import rms_norm as ref_rms_norm
from plain_reference import rope as ref_rope
from sapiens2 import ops
from sapiens2.cuda_tools.emu import DTYPE_CODES, Traffic
from tolerance import DTYPES, check

EPS = 1e-6


def misaligned(t):
    """A contiguous copy of ``t`` one element past a 16-byte boundary (the kernels' scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _case(B, N, HQ, HK, D, P, per_sample, dtype, table_dtype=torch.float32, weight_dtype=None, place=lambda t: t,
          seed=0):
    """P=None: the norm only (no tables)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = r(B, N, HQ, D), r(B, N, HK, D)
    qw, kw = 1 + 0.1 * r(D), 1 + 0.1 * r(D)
    gq, gk = r(B, N, HQ, D), r(B, N, HK, D)
    if P is None:
        sin = cos = None
    else:
        ang = torch.rand(*((B, N - P, D) if per_sample else (N - P, D)), generator=gen, dtype=torch.float64) * 6.28
        # the tables as the kernel gets them; the exact reference uses those values
        sin, cos = torch.sin(ang).to(table_dtype), torch.cos(ang).to(table_dtype)

    def run(dt):
        ins = [t.to(dt).requires_grad_() for t in (q, k, qw, kw)]
        qo, ko = ref_rms_norm(ins[0], ins[2], EPS), ref_rms_norm(ins[1], ins[3], EPS)
        if sin is not None:
            qo, ko = ref_rope(qo, sin.to(dt), cos.to(dt), P), ref_rope(ko, sin.to(dt), cos.to(dt), P)
        grads = torch.autograd.grad([qo, ko], ins, [gq.to(dt), gk.to(dt)])
        return (qo.detach(), ko.detach()), grads

    (ex_q, ex_k), ex_g = run(torch.float64)
    (lo_q, lo_k), lo_g = run(dtype)
    wdt = weight_dtype or dtype
    xs = [place(q.to(dtype)), place(k.to(dtype)), place(qw.to(wdt)), place(kw.to(wdt))]
    xs = [t.requires_grad_() for t in xs]
    qo, ko = ops.qk_norm_rope(*xs, sin, cos, P or 0, EPS)
    dq, dk, dqw, dkw = torch.autograd.grad([qo, ko], xs, [gq.to(dtype), gk.to(dtype)])
    check("q_out", qo.detach(), ex_q, lo_q, dtype)
    check("k_out", ko.detach(), ex_k, lo_k, dtype)
    check("dq", dq, ex_g[0], lo_g[0], dtype)
    check("dk", dk, ex_g[1], lo_g[1], dtype)
    # the weight gradients come back in the weights' dtype
    check("dq_weight", dqw, ex_g[2], lo_g[2].to(wdt), wdt)
    check("dk_weight", dkw, ex_g[3], lo_g[3].to(wdt), wdt)


# (B, N, Hq, Hk, D, prefix (None: norm only), per-sample tables): head dims 64/76/80/128 (16-byte and
# 2-element vectors), GQA and MHA, prefix 0 and 9 (all tokens prefix in one), one token, more
# positions than blocks, odd head counts, D = 100 (lanes left idle), the smallest and the largest
# head dims, the 5B layout (32 q / 16 kv heads at D = 76: 48 head vectors over 8 warps, 6 rounds),
# the norm only, and the real length N = 3081 (1 CLS + 8 registers + 3072 patches) with the
# 0.4B layer's GQA heads (16 q / 8 kv, D = 64)
CASES = [(2, 13, 4, 2, 64, 9, False), (1, 12, 2, 2, 76, 0, True), (2, 10, 4, 4, 80, 9, True),
         (1, 5, 2, 1, 128, 3, True), (1, 1, 1, 1, 64, 0, False), (1, 9, 2, 2, 64, 9, False),
         (2, 25, 3, 1, 80, 0, False), (1, 11, 1, 1, 100, 2, False), (3, 4, 2, 1, 4, 1, True),
         (2, 3, 2, 1, 512, 1, True), (1, 4, 32, 16, 76, 1, False), (2, 7, 4, 2, 64, None, False),
         (1, 3081, 16, 8, 64, 9, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,HQ,HK,D,P,per_sample", CASES)
def test_qk_norm_rope(B, N, HQ, HK, D, P, per_sample, dtype, emulated_cuda):
    if N > 1000 and dtype != torch.bfloat16:
        pytest.skip("the real shape once, in bf16")
    _case(B, N, HQ, HK, D, P, per_sample, dtype, seed=N * D + (P or 0))


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_table_dtypes(table_dtype, emulated_cuda):
    """sin/cos of any float dtype, read and computed in fp32."""
    _case(2, 11, 2, 1, 64, 9, True, torch.bfloat16, table_dtype=table_dtype, seed=5)


def test_fp32_weights_with_bf16_activations(emulated_cuda):
    """Mixed precision keeps fp32 norm weights: read as they are, gradients returned in fp32."""
    _case(2, 6, 4, 2, 80, 1, False, torch.bfloat16, weight_dtype=torch.float32, seed=7)


def test_weights_of_two_dtypes(emulated_cuda):
    """q_weight and k_weight of different dtypes run as fp32 weights (exact for both), the
    gradients coming back in each weight's own dtype."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, 4, 64, generator=gen).bfloat16(), torch.randn(2, 5, 2, 64, generator=gen).bfloat16()
    qw, kw = torch.randn(64, generator=gen), torch.randn(64, generator=gen).bfloat16()
    sin, cos = torch.rand(4, 64, generator=gen), torch.rand(4, 64, generator=gen)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(qw, kw):
        ins = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
        outs = ops.qk_norm_rope(*ins, sin, cos, 1, EPS)
        return outs + torch.autograd.grad(outs, ins, [dq, dk])

    got, want = run(qw, kw), run(qw, kw.float())
    assert got[-2].dtype == torch.float32 and got[-1].dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 76])
def test_unaligned_inputs(D, dtype, emulated_cuda):
    """Tensors not on a 16-byte boundary take the one-element path, with the same accuracy."""
    _case(2, 5, 4, 2, D, 1, True, dtype, place=misaligned, seed=D)


def _inputs(B, N, HQ, HK, D, P, per_sample, dtype):
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    tab = (B, N - P, D) if per_sample else (N - P, D)
    return dict(q=r(B, N, HQ, D), k=r(B, N, HK, D), qw=r(D), kw=r(D), sin=torch.rand(*tab, generator=gen),
                cos=torch.rand(*tab, generator=gen), dq=r(B, N, HQ, D), dk=r(B, N, HK, D))


def _outputs(t, programs, splits):
    B, N, HQ, D = t["q"].shape
    HK = t["k"].shape[2]
    return dict(q_out=torch.empty_like(t["q"]), k_out=torch.empty_like(t["k"]), q_rstd=torch.empty(B, N, HQ),
                k_rstd=torch.empty(B, N, HK), dq_in=torch.empty_like(t["q"]), dk_in=torch.empty_like(t["k"]),
                dqw_part=torch.empty(programs * splits, D), dkw_part=torch.empty(programs * splits, D))


def _fwd(lib, t, o, code, P, per_sample, programs, splits):
    B, N, HQ, D = t["q"].shape
    lib.call("s2_qk_norm_rope_fwd", code, code, t["q"], t["k"], t["qw"], t["kw"], t["sin"], t["cos"], o["q_out"],
             o["k_out"], o["q_rstd"], o["k_rstd"], B, N, HQ, t["k"].shape[2], D, P, per_sample, EPS, programs, splits,
             None, int_args=(0, 1, 18, 20, 21))


def _bwd(lib, t, o, code, P, per_sample, programs, splits):
    B, N, HQ, D = t["q"].shape
    lib.call("s2_qk_norm_rope_bwd", code, code, t["dq"], t["dk"], t["q"], t["k"], t["qw"], t["kw"], t["sin"],
             t["cos"], o["q_rstd"], o["k_rstd"], o["dq_in"], o["dk_in"], o["dqw_part"], o["dkw_part"], B, N, HQ,
             t["k"].shape[2], D, P, per_sample, programs, splits, None, int_args=(0, 1, 22, 23, 24))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 76])
@pytest.mark.parametrize("per_sample,splits", [(False, 1), (True, 2)], ids=["shared-tables", "per-sample-tables"])
def test_traffic_each_byte_once(D, per_sample, splits, dtype, emu_lib, schedule):
    """Global-memory traffic counted by the emulator, byte by byte: q, k, the gradients, the rstd and
    the sin/cos tables read exactly once (a shared table row serves every sample of a block), every
    output written exactly once, the norm weights read once per block, nothing touched elsewhere."""
    B, N, HQ, HK, P = 3, 7, 4, 2, 2
    programs, code = 3, DTYPE_CODES[dtype]
    t = _inputs(B, N, HQ, HK, D, P, per_sample, dtype)
    o = _outputs(t, programs, splits)
    with Traffic(emu_lib, **t, **o) as tr:
        _fwd(emu_lib, t, o, code, P, per_sample, programs, splits)
    assert tr.untracked == (0, 0)
    for name in ("q", "k", "sin", "cos"):
        assert tr[name].reads_each_byte == (1, 1) and tr[name].write_bytes == 0, name
    for name in ("qw", "kw"):
        assert tr[name].reads_each_byte == (programs * splits,) * 2, name
    for name in ("q_out", "k_out", "q_rstd", "k_rstd"):
        assert tr[name].writes_each_byte == (1, 1) and tr[name].read_bytes == 0, name
    for name in ("dq", "dk", "dq_in", "dk_in", "dqw_part", "dkw_part"):
        assert tr[name].read_bytes == tr[name].write_bytes == 0, name

    with Traffic(emu_lib, **t, **o) as tr:
        _bwd(emu_lib, t, o, code, P, per_sample, programs, splits)
    assert tr.untracked == (0, 0)
    for name in ("dq", "dk", "q", "k", "sin", "cos", "q_rstd", "k_rstd"):
        assert tr[name].reads_each_byte == (1, 1) and tr[name].write_bytes == 0, name
    for name in ("qw", "kw"):
        assert tr[name].reads_each_byte == (programs * splits,) * 2, name
    for name in ("dq_in", "dk_in", "dqw_part", "dkw_part"):
        assert tr[name].writes_each_byte == (1, 1) and tr[name].read_bytes == 0, name
    for name in ("q_out", "k_out"):
        assert tr[name].read_bytes == tr[name].write_bytes == 0, name


def test_thread_order_does_not_change_results(emu_lib):
    """Forward and backward with the block's threads resumed in reverse order give identical bits
    (shuffles, the staged table rows and the shared-memory weight-gradient sums included): the 5B
    head layout, GQA, D = 76, two samples per block on shared tables."""
    code, programs, splits, P = DTYPE_CODES[torch.bfloat16], 2, 1, 1
    t = _inputs(2, 5, 32, 16, 76, P, False, torch.bfloat16)
    runs = []
    for rev in (False, True):
        emu_lib.set_reverse(rev)
        o = _outputs(t, programs, splits)
        _fwd(emu_lib, t, o, code, P, False, programs, splits)
        _bwd(emu_lib, t, o, code, P, False, programs, splits)
        runs.append(o)
    emu_lib.set_reverse(False)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_opcheck(emulated_cuda):
    B, N, HQ, HK, D, P = 2, 6, 4, 2, 64, 2
    q, k = torch.randn(B, N, HQ, D), torch.randn(B, N, HK, D)
    qw, kw = torch.randn(D), torch.randn(D)
    sin, cos = torch.rand(N - P, D), torch.rand(N - P, D)
    sin_b, cos_b = torch.rand(B, N - P, D), torch.rand(B, N - P, D)
    S = torch.ops.sapiens2
    torch.library.opcheck(S.qk_norm_rope, (q, k, qw, kw, sin, cos, P, EPS))
    torch.library.opcheck(S.qk_norm_rope, (q.bfloat16(), k.bfloat16(), qw.bfloat16(), kw.bfloat16(), sin_b, cos_b, P,
                                           EPS))
    torch.library.opcheck(S.qk_norm_rope, (q, k, qw, kw, None, None, 0, EPS))
    _, _, qr, kr = S.qk_norm_rope(q, k, qw, kw, sin, cos, P, EPS)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    torch.library.opcheck(S.qk_norm_rope_backward, (dq, dk, q, k, qw, kw, sin, cos, qr, kr, P))
    E = torch.ops.sapiens2_emu
    torch.library.opcheck(E.qk_norm_rope_fwd, (q, k, qw, kw, sin_b, cos_b, P, EPS))
    torch.library.opcheck(E.qk_norm_rope_fwd, (q, k, qw, kw, None, None, 0, EPS))
    torch.library.opcheck(E.qk_norm_rope_bwd, (dq, dk, q, k, qw, kw, sin, cos, qr, kr, P))
    torch.library.opcheck(E.qk_norm_rope_bwd, (dq, dk, q, k, qw, kw, None, None, qr, kr, 0))


def test_binding_errors_name_the_argument(_emu_ext):
    E = torch.ops.sapiens2_emu
    B, N, D, P = 1, 5, 64, 1
    q, k, w = torch.randn(B, N, 4, D), torch.randn(B, N, 2, D), torch.randn(D)
    sin = cos = torch.rand(N - P, D)
    rq, rk = torch.rand(B, N, 4), torch.rand(B, N, 2)
    fwd = E.qk_norm_rope_fwd
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        fwd(q.double(), k.double(), w, w, sin, cos, P, EPS)
    with pytest.raises(TypeError, match="k has dtype"):
        fwd(q, k.bfloat16(), w, w, sin, cos, P, EPS)
    with pytest.raises(ValueError, match="q must be contiguous"):
        fwd(q.transpose(1, 2), k, w, w, sin, cos, P, EPS)
    with pytest.raises(ValueError, match=r"q must be \(B, N, heads, head_dim\)"):
        fwd(q[0], k, w, w, sin, cos, P, EPS)
    with pytest.raises(ValueError, match=r"k must be \(B=1, N=5, kv_heads, D=64\)"):
        fwd(q, torch.randn(B, N, 2, 32), w, w, sin, cos, P, EPS)
    for bad in (66, 516):
        x = torch.randn(B, N, 1, bad)
        with pytest.raises(ValueError, match=f"head_dim {bad} is not supported"):
            fwd(x, x, torch.randn(bad), torch.randn(bad), None, None, 0, EPS)
    with pytest.raises(ValueError, match=r"k_weight must have shape \(64\)"):
        fwd(q, k, w, torch.randn(63), sin, cos, P, EPS)
    with pytest.raises(TypeError, match="k_weight has dtype"):
        fwd(q, k, w, w.bfloat16(), sin, cos, P, EPS)
    with pytest.raises(ValueError, match="sin and cos must be given together"):
        fwd(q, k, w, w, sin, None, P, EPS)
    with pytest.raises(TypeError, match="sin must be float32"):
        fwd(q, k, w, w, sin.bfloat16(), cos, P, EPS)
    with pytest.raises(ValueError, match=r"cos must have shape \(N - num_prefix_tokens, D\)"):
        fwd(q, k, w, w, sin, torch.rand(N, D), P, EPS)
    with pytest.raises(ValueError, match="num_prefix_tokens must be in"):
        fwd(q, k, w, w, sin, cos, N + 1, EPS)
    bwd = E.qk_norm_rope_bwd
    with pytest.raises(ValueError, match="dk must have shape"):
        bwd(q, q, q, k, w, w, sin, cos, rq, rk, P)
    with pytest.raises(ValueError, match="k_rstd must hold one value per head vector"):
        bwd(q, k, q, k, w, w, sin, cos, rq, rq, P)
    with pytest.raises(TypeError, match="q_rstd must be float32"):
        bwd(q, k, q, k, w, w, sin, cos, rq.double(), rk, P)


def test_no_tokens_give_zero_weight_gradients(emulated_cuda):
    E = torch.ops.sapiens2_emu
    q, k, w = torch.empty(2, 0, 4, 64), torch.empty(2, 0, 2, 64), torch.ones(64)
    qo, ko, qr, kr = E.qk_norm_rope_fwd(q, k, w, w, None, None, 0, EPS)
    assert qo.shape == q.shape and ko.shape == k.shape and qr.shape == (2, 0, 4) and kr.shape == (2, 0, 2)
    dq, dk, dqw, dkw = E.qk_norm_rope_bwd(q, k, q, k, w, w, None, None, qr, kr, 0)
    assert dq.shape == q.shape and torch.equal(dqw, torch.zeros(64)) and torch.equal(dkw, torch.zeros(64))
