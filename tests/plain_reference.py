"""Independent float64 definitions written with plain autograd-able torch ops.

These mirror the official Sapiens2 code (``repeat_interleave`` for GQA, ``torch.cat`` for the
prefix tokens, explicit softmax) and are used to check every backend's forward and backward.
"""

from __future__ import annotations

import torch


def rms_norm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x, sin, cos, p):
    """x (B, N, H, D); sin/cos (N - p, D) or (B, N - p, D)."""
    s = sin[None, :, None] if sin.dim() == 2 else sin[:, :, None]
    c = cos[None, :, None] if cos.dim() == 2 else cos[:, :, None]
    return torch.cat([x[:, :p], x[:, p:] * c + rotate_half(x[:, p:]) * s], dim=1)


def swiglu(x12):
    a, b = x12.chunk(2, dim=-1)
    return a * torch.sigmoid(a) * b


def attention(q, k, v, qw=None, kw=None, sin=None, cos=None, p=0, seq_lens=None, scale=None, eps=1e-6):
    B, N, H, D = q.shape
    G = H // k.shape[2]
    if qw is not None:
        q, k = rms_norm(q, qw, eps), rms_norm(k, kw, eps)
    if sin is not None:
        q, k = rope(q, sin, cos, p), rope(k, sin, cos, p)
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if seq_lens is not None:
        keep = torch.arange(N, device=q.device)[None, :] < seq_lens[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    o = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, -1), v)
    if seq_lens is not None:
        o = o * keep[:, :, None, None]
    return o


def windows(x, gh, gw, w):
    """(B, gh*gw, H, D) grid -> (B, nW, w*w, H, D)."""
    B, L, H, D = x.shape
    return x.reshape(B, gh // w, w, gw // w, w, H, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, -1, w * w, H, D)


def unwindows(x, gh, gw, w):
    B, nW, ww, H, D = x.shape
    return x.reshape(B, gh // w, gw // w, w, w, H, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, gh * gw, H, D)


def window_attention(q, k, v, gh, gw, w, pq=None, pk=None, pv=None, token_mask=None):
    """Grid layout reference: every window attends within itself (plus its prefix token)."""
    qs, ks, vs = (windows(t, gh, gw, w) for t in (q, k, v))  # (B, nW, ww, H, D)
    if pq is not None:
        qs, ks, vs = (torch.cat([p[:, :, None], t], dim=2) for p, t in ((pq, qs), (pk, ks), (pv, vs)))
    s = torch.einsum("bwihd,bwjhd->bwhij", qs, ks) * q.shape[-1] ** -0.5
    if token_mask is not None:
        m = windows(token_mask[:, :, None, None], gh, gw, w)[..., 0, 0]  # (B, nW, ww)
        if pq is not None:
            m = torch.cat([torch.ones_like(m[..., :1]), m], dim=-1)
        s = s.masked_fill(~m[:, :, None, None, :], float("-inf"))
    o = torch.einsum("bwhij,bwjhd->bwihd", torch.softmax(s, -1).nan_to_num(0.0), vs)  # empty window -> 0
    if pq is not None:
        return unwindows(o[:, :, 1:], gh, gw, w), o[:, :, 0]
    return unwindows(o, gh, gw, w)
