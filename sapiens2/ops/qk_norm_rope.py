"""Per-head QK-RMSNorm followed by rotate-half 2D RoPE, for q and k in one dispatched op.

Layout ``(B, N, heads, D)`` straight from the projections. Tokens ``n < num_prefix_tokens``
(CLS + registers) are normalised but not rotated; token ``n >= p`` uses row ``n - p`` of
``sin``/``cos`` (``(N - p, D)`` shared, or ``(B, N - p, D)`` per sample for MAE-kept positions).

Forward, per head vector ``x`` (``rot([x1, x2]) = [-x2, x1]`` on the halves of D)::

    xn  = x * rstd * w,   rstd = 1 / sqrt(mean(x^2) + eps)
    out = xn * cos + rot(xn) * sin

Backward: RoPE is a rotation per pair, so ``dxn = dout * cos + rot^T(dout * sin)`` with
``rot^T([y1, y2]) = [y2, -y1]``, followed by the RMSNorm backward (see ``rms_norm.py``).

The reference computes RoPE in the dtype of ``sin``/``cos`` after rounding q and k to it, exactly
as the official code does (its default bf16 RoPE rounds q and k through bf16). The kernels
compute RoPE in fp32 whatever the dtype of sin/cos; compare backends with float32 sin/cos.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend
from ._checks import check_float, check_same_device, check_shape, stat_dtype
from .rms_norm import _rms_norm_bwd_ref, _rms_norm_ref


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotate_half_t(y: Tensor) -> Tensor:
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat([y2, -y1], dim=-1)


def _bcast(t: Tensor) -> Tensor:
    """(N', D) -> (1, N', 1, D); (B, N', D) -> (B, N', 1, D)."""
    return t[None, :, None, :] if t.dim() == 2 else t[:, :, None, :]


def rope_ref(x: Tensor, sin: Tensor, cos: Tensor, p: int) -> Tensor:
    """Official RoPE application: round to the RoPE dtype, rotate tokens >= p, cast back."""
    xr = x.to(sin.dtype)
    rot = xr[:, p:] * _bcast(cos) + _rotate_half(xr[:, p:]) * _bcast(sin)
    return torch.cat([xr[:, :p], rot], dim=1).to(x.dtype)


def rope_bwd_ref(dout: Tensor, sin: Tensor, cos: Tensor, p: int) -> Tensor:
    """fp32 gradient through ``rope_ref`` (the dtype roundings pass gradients straight through)."""
    acc = stat_dtype(dout)
    g = dout.to(acc)
    s, c = _bcast(sin).to(acc), _bcast(cos).to(acc)
    rot = g[:, p:] * c + _rotate_half_t(g[:, p:] * s)
    return torch.cat([g[:, :p], rot], dim=1)


def _qk_norm_rope_ref(q, k, q_weight, k_weight, sin, cos, p, eps):
    qn, q_rstd = _rms_norm_ref(q, q_weight, eps)
    kn, k_rstd = _rms_norm_ref(k, k_weight, eps)
    if sin is not None:
        qn = rope_ref(qn, sin, cos, p)
        kn = rope_ref(kn, sin, cos, p)
    return qn, kn, q_rstd, k_rstd


def _qk_norm_rope_bwd_ref(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, p):
    if sin is not None:
        dq = rope_bwd_ref(dq, sin, cos, p)
        dk = rope_bwd_ref(dk, sin, cos, p)
    dq_in, dqw = _rms_norm_bwd_ref(dq, q, q_weight, q_rstd)
    dk_in, dkw = _rms_norm_bwd_ref(dk, k, k_weight, k_rstd)
    return dq_in, dk_in, dqw, dkw


@torch.library.custom_op("sapiens2::qk_norm_rope", mutates_args=())
def _qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    num_prefix_tokens: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backend.select("qk_norm_rope", q)
    if impl == "reference":
        return _qk_norm_rope_ref(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps)
    return impl(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps)


@_qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        q.new_empty(q.shape[:-1], dtype=stat_dtype(q)),
        k.new_empty(k.shape[:-1], dtype=stat_dtype(k)),
    )


@torch.library.custom_op("sapiens2::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(
    dq: Tensor,
    dk: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    q_rstd: Tensor,
    k_rstd: Tensor,
    num_prefix_tokens: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backend.select("qk_norm_rope_backward", q)
    if impl == "reference":
        return _qk_norm_rope_bwd_ref(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens)
    return impl(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens)


@_qk_norm_rope_backward.register_fake
def _(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    q, k, qw, kw, sin, cos, p, _ = inputs
    ctx.p = p
    ctx.save_for_backward(q, k, qw, kw, sin, cos, output[2], output[3])


def _autograd(ctx, dq, dk, _dqr, _dkr):
    q, k, qw, kw, sin, cos, q_rstd, k_rstd = ctx.saved_tensors
    dq = torch.zeros_like(q) if dq is None else dq
    dk = torch.zeros_like(k) if dk is None else dk
    dq_in, dk_in, dqw, dkw = torch.ops.sapiens2.qk_norm_rope_backward(
        dq, dk, q, k, qw, kw, sin, cos, q_rstd, k_rstd, ctx.p
    )
    return dq_in, dk_in, dqw, dkw, None, None, None, None


backend.register_autograd("sapiens2::qk_norm_rope", _autograd, setup_context=_setup)


def check_rope(sin: Optional[Tensor], cos: Optional[Tensor], B: int, N: int, D: int, p: int, ref: Tensor) -> None:
    """Validate a (sin, cos) pair for ``N`` tokens of which ``p`` are prefix tokens."""
    if (sin is None) != (cos is None):
        raise ValueError("sin and cos must be given together")
    if not 0 <= p <= N:
        raise ValueError(f"num_prefix_tokens must be in [0, N={N}], got {p}")
    if sin is None:
        return
    if D % 2:
        raise ValueError(f"rotate-half RoPE needs an even head dim, got {D}")
    check_float("sin", sin)
    check_float("cos", cos)
    for name, t in (("sin", sin), ("cos", cos)):
        if tuple(t.shape) not in ((N - p, D), (B, N - p, D)):
            raise ValueError(
                f"{name} must have shape (N - num_prefix_tokens, D) = {(N - p, D)} or per sample "
                f"{(B, N - p, D)}, got {tuple(t.shape)}"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"sin {tuple(sin.shape)} and cos {tuple(cos.shape)} must have one shape")
    check_same_device(q=ref, sin=sin, cos=cos)


def check_heads(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> tuple[int, int, int, int, int]:
    """Validate the (B, N, H, D) / (B, N, Hkv, D) pair (and v); return B, N, H, Hkv, D."""
    check_float("q", q)
    check_float("k", k)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, N, heads, head_dim), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be (B, N, kv_heads, head_dim), got shape {tuple(k.shape)}")
    B, N, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, N={N}, kv_heads, D={D}) to match q, got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k heads ({Hkv})")
    if v is not None:
        check_float("v", v)
        check_shape("v", v, tuple(k.shape))
    if k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {None if v is None else v.dtype}")
    check_same_device(q=q, k=k, v=v)
    return B, N, H, Hkv, D


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    sin: Optional[Tensor] = None,
    cos: Optional[Tensor] = None,
    num_prefix_tokens: int = 0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q ``(B, N, H, D)`` and k ``(B, N, Hkv, D)``, then 2D RoPE on tokens >= p."""
    B, N, H, Hkv, D = check_heads(q, k)
    check_float("q_weight", q_weight)
    check_float("k_weight", k_weight)
    check_shape("q_weight", q_weight, (D,))
    check_shape("k_weight", k_weight, (D,))
    check_rope(sin, cos, B, N, D, num_prefix_tokens, q)
    check_same_device(q=q, q_weight=q_weight, k_weight=k_weight)
    qo, ko, _, _ = torch.ops.sapiens2.qk_norm_rope(q, k, q_weight, k_weight, sin, cos, int(num_prefix_tokens), float(eps))
    return qo, ko
