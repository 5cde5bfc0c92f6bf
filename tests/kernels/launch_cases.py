"""Example arguments for every ``sapiens2`` op, for the launch-plan tests: small bf16 shapes with
ragged tails, each flag of each op (prologue, GQA, lengths, prefix, masks, packed layouts)."""

from __future__ import annotations

import torch

BF16 = torch.bfloat16


def _t(*shape, dtype=BF16, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g).to(dtype)


def cases() -> list[tuple[str, str, tuple]]:
    """(case id, op name, args)."""
    B, N, H, Hkv, D, P = 2, 40, 4, 2, 80, 9
    q, k, v = _t(B, N, H, D), _t(B, N, Hkv, D), _t(B, N, Hkv, D)
    qw, kw = _t(D), _t(D)
    sin, cos = _t(N - P, D, dtype=torch.float32), _t(N - P, D, dtype=torch.float32)
    sin16, cos16 = sin.to(BF16), cos.to(BF16)
    lens = torch.tensor([N, 23])
    o, lse = _t(B, N, H, D), _t(B, H, N, dtype=torch.float32)
    do = _t(B, N, H, D)
    q64, k64 = _t(B, 33, 2, 64), _t(B, 33, 2, 64)
    o64, lse64, do64 = _t(B, 33, 2, 64), _t(B, 2, 33, dtype=torch.float32), _t(B, 33, 2, 64)
    out = [
        ("attention-plain-d64", "attention", (q64, k64, _t(B, 33, 2, 64), None, None, None, None, 0, None, 0.125, 1e-6, False)),
        ("attention-gqa-normrope-d80", "attention", (q, k, v, qw, kw, sin16, cos16, P, None, 0.1, 1e-6, False)),
        ("attention-lens-rope-fp32tables", "attention", (q, k, v, None, None, sin, cos, P, lens, 0.1, 1e-6, False)),
        ("attention_backward-plain-d64", "attention_backward",
         (do64, q64, k64, _t(B, 33, 2, 64), o64, lse64, None, None, None, None, 0, None, 0.125, 1e-6, False)),
        ("attention_backward-gqa-normrope", "attention_backward",
         (do, q, k, v, o, lse, qw, kw, sin16, cos16, P, None, 0.1, 1e-6, False)),
        ("attention_backward-deterministic-normrope-lens", "attention_backward",
         (do, q, k, v, o, lse, qw, kw, sin, cos, P, lens, 0.1, 1e-6, True)),
        ("attention_backward-deterministic-plain", "attention_backward",
         (do64, q64, k64, _t(B, 33, 2, 64), o64, lse64, None, None, None, None, 0, None, 0.125, 1e-6, True)),
    ]
    qkv3 = _t(B, N, H + 2 * Hkv, D)  # packed GQA projection: 4 query + 2 key + 2 value heads
    o3, lse3 = _t(B, N, H, D), _t(B, H, N, dtype=torch.float32)
    out += [
        ("attention_qkv-gqa-normrope", "attention_qkv", (qkv3, H, qw, kw, sin16, cos16, P, None, 0.1, 1e-6, False)),
        ("attention_qkv-plain-lens", "attention_qkv", (qkv3, H, None, None, None, None, 0, lens, 0.1, 1e-6, False)),
        ("attention_qkv_backward-gqa-normrope", "attention_qkv_backward",
         (do, qkv3, o3, lse3, H, qw, kw, sin16, cos16, P, None, 0.1, 1e-6, False)),
        ("attention_qkv_backward-deterministic-plain", "attention_qkv_backward",
         (do, qkv3, o3, lse3, H, None, None, None, None, 0, None, 0.1, 1e-6, True)),
        ("attention_qkv_backward-bias-normrope", "attention_qkv_backward",
         (do, qkv3, o3, lse3, H, qw, kw, sin16, cos16, P, None, 0.1, 1e-6, False, True)),
        ("attention_qkv_backward-bias-deterministic-lens", "attention_qkv_backward",
         (do, qkv3, o3, lse3, H, qw, kw, sin, cos, P, lens, 0.1, 1e-6, True, True)),
    ]
    C = 96
    x, r, w, s = _t(3, 7, C), _t(3, 7, C), _t(C), _t(C)
    rstd = _t(3, 7, dtype=torch.float32).abs() + 0.5
    out += [
        ("rms_norm", "rms_norm", (x, w, 1e-6)),
        ("rms_norm_backward", "rms_norm_backward", (_t(3, 7, C), x, w, rstd)),
        ("add_rms_norm-scale", "add_rms_norm", (x, r, s, w, 1e-6)),
        ("add_rms_norm-noscale", "add_rms_norm", (x, r, None, w, 1e-6)),
        ("add_rms_norm_backward-scale-dh", "add_rms_norm_backward", (_t(3, 7, C), _t(3, 7, C), x, r, s, w, rstd)),
        ("add_rms_norm_backward-noscale", "add_rms_norm_backward", (_t(3, 7, C), None, x, r, None, w, rstd)),
    ]
    F = 72
    x12, ds = _t(5, 3, 2 * F), _t(5, 3, F)
    out += [
        ("swiglu", "swiglu", (x12,)),
        ("swiglu_backward", "swiglu_backward", (ds, x12)),
        ("swiglu_recompute_backward-bias", "swiglu_recompute_backward", (ds, x12, True)),
        ("swiglu_recompute_backward-nobias", "swiglu_recompute_backward", (ds, x12, False)),
        ("swiglu_bias_backward", "swiglu_bias_backward", (ds, x12)),
    ]
    qr, kr = _t(B, N, H, dtype=torch.float32).abs() + 0.5, _t(B, N, Hkv, dtype=torch.float32).abs() + 0.5
    out += [
        ("qk_norm_rope", "qk_norm_rope", (q, k, qw, kw, sin, cos, P, 1e-6)),
        ("qk_norm_rope_backward", "qk_norm_rope_backward", (_t(B, N, H, D), _t(B, N, Hkv, D), q, k, qw, kw, sin, cos,
                                                             qr, kr, P)),
        ("qk_norm_rope-bf16tables", "qk_norm_rope", (q, k, qw, kw, sin16, cos16, P, 1e-6)),
        ("qk_norm_rope_backward-bf16tables-mixedweights", "qk_norm_rope_backward",
         (_t(B, N, H, D), _t(B, N, Hkv, D), q, k, qw.float(), kw, sin16, cos16, qr, kr, P)),
    ]
    gh, gw, win, NH, WD = 8, 12, 4, 2, 64
    L, nW = gh * gw, (gh // win) * (gw // win)
    tq, tk, tv = _t(1, L, NH, WD), _t(1, L, NH, WD), _t(1, L, NH, WD)
    pq, pk, pv = _t(1, nW, NH, WD), _t(1, nW, NH, WD), _t(1, nW, NH, WD)
    wo, wpo, wlse = _t(1, L, NH, WD), _t(1, nW, NH, WD), _t(nW, NH, win * win + 1, dtype=torch.float32)
    qkv, pqkv = _t(1, L, 3, NH, WD), _t(1, nW, 3, NH, WD)
    mask = torch.rand(1, L, generator=torch.Generator().manual_seed(3)) > 0.3
    out += [
        ("window_attention-prefix", "window_attention", (tq, tk, tv, pq, pk, pv, None, gh, gw, win, "grid", 0.125)),
        ("window_attention-mask", "window_attention", (tq, tk, tv, None, None, None, mask, gh, gw, win, "grid", 0.125)),
        ("window_attention_backward-prefix", "window_attention_backward",
         (_t(1, L, NH, WD), _t(1, nW, NH, WD), tq, tk, tv, pq, pk, pv, None, wo, wpo, wlse, gh, gw, win, "grid", 0.125)),
        ("window_attention_qkv-prefix", "window_attention_qkv", (qkv, pqkv, None, gh, gw, win, "grid", 0.125)),
        ("window_attention_qkv_backward-bias", "window_attention_qkv_backward",
         (_t(1, L, NH, WD), _t(1, nW, NH, WD), qkv, pqkv, None, wo, wpo, wlse, gh, gw, win, "grid", 0.125, True)),
        ("cls_pool", "cls_pool", (pq, pk, pv, tk, tv, gh, gw, win, "grid", 0.125)),
        ("cls_pool_backward", "cls_pool_backward",
         (_t(1, nW, NH, WD), pq, pk, pv, tk, tv, wpo, _t(nW, NH, 1, dtype=torch.float32), gh, gw, win, "grid", 0.125)),
        ("cls_pool_kv", "cls_pool_kv", (pqkv, _t(1, L, 2, NH, WD), gh, gw, win, "grid", 0.125)),
        ("cls_pool_kv_backward", "cls_pool_kv_backward",
         (_t(1, nW, NH, WD), pqkv, _t(1, L, 2, NH, WD), wpo, _t(nW, NH, 1, dtype=torch.float32), gh, gw, win, "grid",
          0.125)),
        ("partial_sums", "partial_sums", (_t(37, 150, dtype=torch.float32), BF16)),
    ]
    return out
