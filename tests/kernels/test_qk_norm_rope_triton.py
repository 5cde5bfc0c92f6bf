"""Per-head QK-RMSNorm + 2D rotate-half RoPE Triton kernels (q and k in one launch) under the
interpreter (CPU) vs a float64 plain-torch reference (autograd): outputs, q/k gradients and both
norm-weight gradients.

Tolerance rule: max-abs error vs float64 <= 2 x (max-abs error of the same plain-torch computation
run in the low precision) + 1 ulp of the output dtype at the float64 output's scale.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from plain_reference import rms_norm as ref_rms_norm  # noqa: E402
from plain_reference import rope as ref_rope  # noqa: E402
from sapiens2.kernels import qk_norm_rope as QK  # noqa: E402
from tolerance import DTYPES, check  # noqa: E402

EPS = 1e-6


def _case(B, N, HQ, HK, D, P, per_sample, dtype, table_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = r(B, N, HQ, D), r(B, N, HK, D)
    qw, kw = 1 + 0.1 * r(D), 1 + 0.1 * r(D)
    ang = torch.rand(*((B, N - P, D) if per_sample else (N - P, D)), generator=gen, dtype=torch.float64) * 6.28
    # the tables as the kernel gets them (any float dtype); the exact reference uses those values
    sin, cos = torch.sin(ang).to(table_dtype), torch.cos(ang).to(table_dtype)
    gq, gk = r(B, N, HQ, D), r(B, N, HK, D)

    def run(dt):
        ins = [t.to(dt).requires_grad_() for t in (q, k, qw, kw)]
        s, c = sin.to(dt), cos.to(dt)
        qo = ref_rope(ref_rms_norm(ins[0], ins[2]), s, c, P)
        ko = ref_rope(ref_rms_norm(ins[1], ins[3]), s, c, P)
        grads = torch.autograd.grad([qo, ko], ins, [gq.to(dt), gk.to(dt)])
        return (qo.detach(), ko.detach()), grads

    (ex_q, ex_k), ex_g = run(torch.float64)
    (lo_q, lo_k), lo_g = run(dtype)
    d = lambda t: t.to(dtype)  # noqa: E731
    qo, ko, qr, kr = QK.qk_norm_rope_fwd(d(q), d(k), d(qw), d(kw), sin, cos, P, EPS)
    assert qr.shape == (B, N, HQ) and kr.shape == (B, N, HK) and qr.dtype == kr.dtype == torch.float32
    dq, dk, dqw, dkw = QK.qk_norm_rope_bwd(d(gq), d(gk), d(q), d(k), d(qw), d(kw), sin, cos, qr, kr, P)
    check("q_out", qo, ex_q, lo_q, dtype)
    check("k_out", ko, ex_k, lo_k, dtype)
    for name, got, e, lo in zip(("dq", "dk", "dq_weight", "dk_weight"), (dq, dk, dqw, dkw), ex_g, lo_g):
        check(name, got, e, lo, dtype)


# (B, N, Hq, Hk, D, prefix, per-sample tables): head dims 64/76/80/128, GQA and MHA, prefix 0 and 9
# (all tokens prefix in the last one), one token, more tokens than backward programs
CASES = [(2, 13, 4, 2, 64, 9, False), (1, 12, 2, 2, 76, 0, True), (2, 10, 4, 4, 80, 9, True),
         (1, 5, 2, 1, 128, 3, True), (1, 1, 1, 1, 64, 0, False), (1, 9, 2, 2, 64, 9, False),
         (2, 25, 3, 1, 80, 0, False), (1, 11, 1, 1, 100, 2, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,HQ,HK,D,P,per_sample", CASES)
def test_qk_norm_rope(B, N, HQ, HK, D, P, per_sample, dtype):
    _case(B, N, HQ, HK, D, P, per_sample, dtype, seed=N * D + P)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_table_dtypes(table_dtype):
    """sin/cos of any float dtype, read and computed in fp32."""
    _case(2, 11, 2, 1, 64, 9, True, torch.bfloat16, table_dtype, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rope_full_size(dtype):
    """A real layer's heads (16 q / 8 kv heads, D = 64, GQA) over 265 tokens = 9 prefix + a 16 x 16
    patch grid, two samples with per-sample tables."""
    _case(2, 265, 16, 8, 64, 9, True, dtype, seed=265)


@pytest.mark.slow
def test_qk_norm_rope_real_length():
    """The real length N = 3081 (1 CLS + 8 registers + 3072 patches) with a GQA pair of heads: all
    heads of a token share one program, so the head count adds no new code path. Once, in bf16 (the
    training dtype; as the CUDA tests do): every dtype runs test_qk_norm_rope_full_size's real heads."""
    _case(1, 3081, 2, 1, 64, 9, False, torch.bfloat16, seed=3081)


def test_real_model_heads_d76():
    """The 5B layout (32 heads, GQA 16 kv heads, D = 76) on a few tokens, bf16."""
    _case(1, 4, 32, 16, 76, 1, False, torch.bfloat16, seed=76)
