"""Softmax attention with GQA (no K/V copies), optional fused QK-RMSNorm + 2D RoPE prologue and
per-sample valid lengths, on the projections' natural ``(B, N, heads, D)`` layout.

``q: (B, N, H, D)``, ``k, v: (B, N, Hkv, D)`` with ``H % Hkv == 0``; query head ``h`` uses KV
head ``h // (H // Hkv)`` (the official ``repeat_interleave`` mapping). Returns ``(B, N, H, D)``.
Forward keeps only the output and the fp32 log-sum-exp ``(B, H, N)`` for backward; backward
recomputes the probabilities (and the norm + RoPE prologue).

``seq_lens`` (``(B,)`` int, prefix tokens included): keys at positions ``>= seq_lens[b]`` are
masked, and query rows past it get output 0 and gradient 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend, determinism
from ._checks import check_float, check_same_device, check_seq_lens, check_shape, stat_dtype
from ._sdpa_ref import sdpa_bwd, sdpa_fwd
from .qk_norm_rope import _qk_norm_rope_bwd_ref, _qk_norm_rope_ref, check_heads, check_rope, rope_bwd_ref, rope_ref


def kernel_limits(D: int) -> Optional[str]:
    """Why the attention kernels cannot take head dim ``D`` (None when they can): their tensor-core
    tiles need D >= 16. The reference backend takes any D; ``auto`` picks it for such inputs."""
    return f"head dim {D} < 16 (the attention kernels' tensor-core tiles need D >= 16)" if D < 16 else None


def _group(q: Tensor, Hkv: int) -> Tensor:
    """(B, N, H, D) -> (B, Hkv, G*N, D): the G query heads of a KV head stacked along the rows."""
    B, N, H, D = q.shape
    return q.reshape(B, N, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, (H // Hkv) * N, D)


def _ungroup(x: Tensor, H: int) -> Tensor:
    """(B, Hkv, G*N, D) -> (B, N, H, D)."""
    B, Hkv, GN, D = x.shape
    N = GN // (H // Hkv)
    return x.reshape(B, Hkv, H // Hkv, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H, D)


def _key_mask(seq_lens: Optional[Tensor], N: int) -> Optional[Tensor]:
    if seq_lens is None:
        return None
    return (torch.arange(N, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def _row_mask(seq_lens: Tensor, N: int) -> Tensor:
    """(B, N, 1, 1) True for valid query rows."""
    return (torch.arange(N, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, :, None, None]


def _prologue_ref(q, k, q_w, k_w, sin, cos, p, eps):
    if q_w is not None:
        q, k, _, _ = _qk_norm_rope_ref(q, k, q_w, k_w, sin, cos, p, eps)
    elif sin is not None:
        q, k = rope_ref(q, sin, cos, p), rope_ref(k, sin, cos, p)
    return q, k


def _attention_ref(q, k, v, q_w, k_w, sin, cos, p, seq_lens, scale, eps):
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    q, k = _prologue_ref(q, k, q_w, k_w, sin, cos, p, eps)
    kt, vt, mask = k.transpose(1, 2), v.transpose(1, 2), _key_mask(seq_lens, N)
    # One call per query head of each group: every call sees the shapes the official per-head
    # SDPA sees (N queries, N keys), so the CPU kernel rounds identically; K and V are not copied.
    o = q.new_empty(B, N, H, D)
    lse = q.new_empty(B, H, N, dtype=stat_dtype(q))
    for g in range(G):
        o_g, lse_g = sdpa_fwd(q[:, :, g::G].transpose(1, 2), kt, vt, mask, scale)
        o[:, :, g::G] = o_g.transpose(1, 2)
        lse[:, g::G] = lse_g
    if seq_lens is not None:
        rows = _row_mask(seq_lens, N)
        o = o.masked_fill(~rows, 0.0)
        lse = lse.masked_fill(~rows[:, :, 0, 0][:, None, :], 0.0)
    return o, lse.contiguous()


def _attention_bwd_ref(do, q, k, v, q_w, k_w, sin, cos, p, seq_lens, scale, eps, o, lse):
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    qp, kp = _prologue_ref(q, k, q_w, k_w, sin, cos, p, eps)
    if seq_lens is not None:
        do = do.masked_fill(~_row_mask(seq_lens, N), 0.0)
    lse_g = lse.reshape(B, Hkv, (H // Hkv) * N)
    dq, dk, dv = sdpa_bwd(
        _group(do, Hkv), _group(qp, Hkv), kp.transpose(1, 2), v.transpose(1, 2), _group(o, Hkv), lse_g,
        _key_mask(seq_lens, N), scale,
    )
    dq, dk, dv = _ungroup(dq, H), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    if q_w is not None:
        _, _, q_rstd, k_rstd = _qk_norm_rope_ref(q, k, q_w, k_w, None, None, p, eps)
        dq, dk, dqw, dkw = _qk_norm_rope_bwd_ref(dq, dk, q, k, q_w, k_w, sin, cos, q_rstd, k_rstd, p)
        return dq, dk, dv.to(v.dtype), dqw, dkw
    if sin is not None:
        dq, dk = rope_bwd_ref(dq, sin, cos, p), rope_bwd_ref(dk, sin, cos, p)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), q.new_empty(0), q.new_empty(0)


@torch.library.custom_op("sapiens2::attention", mutates_args=())
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_norm_weight: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    num_prefix_tokens: int,
    seq_lens: Optional[Tensor],
    scale: float,
    norm_eps: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    # ``deterministic`` only matters to the backward; the forward takes it so that autograd keeps it
    impl = backend.select("attention", q, unsupported=kernel_limits(q.shape[-1]))
    args = (q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps)
    if impl == "reference":
        return _attention_ref(*args)
    return impl(*args)


@_attention.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps,
      deterministic=False):
    B, N, H, D = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=stat_dtype(q))


@torch.library.custom_op("sapiens2::attention_backward", mutates_args=())
def _attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    q_norm_weight: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    sin: Optional[Tensor],
    cos: Optional[Tensor],
    num_prefix_tokens: int,
    seq_lens: Optional[Tensor],
    scale: float,
    norm_eps: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dq_norm_weight, dk_norm_weight); the last two empty without norms.
    ``deterministic``: no atomics (the kernels recompute S and dP for dQ: 7 GEMMs instead of 5)."""
    impl = backend.select("attention_backward", q, unsupported=kernel_limits(q.shape[-1]))
    if impl != "reference":
        return impl(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
                    norm_eps, deterministic)
    return _attention_bwd_ref(
        do, q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps, o, lse
    )


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps,
      deterministic=False):
    if q_norm_weight is None:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(0), q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(q_norm_weight), torch.empty_like(k_norm_weight))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    q, k, v, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic = inputs
    ctx.p, ctx.scale, ctx.eps, ctx.deterministic = p, scale, eps, deterministic
    ctx.has_norm = qw is not None
    ctx.save_for_backward(q, k, v, qw, kw, sin, cos, seq_lens, output[0], output[1])


def _autograd(ctx, do, _dlse):
    q, k, v, qw, kw, sin, cos, seq_lens, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dq, dk, dv, dqw, dkw = torch.ops.sapiens2.attention_backward(
        do.contiguous(), q, k, v, o, lse, qw, kw, sin, cos, ctx.p, seq_lens, ctx.scale, ctx.eps, ctx.deterministic
    )
    if not ctx.has_norm:
        dqw = dkw = None
    return dq, dk, dv, dqw, dkw, None, None, None, None, None, None, None


backend.register_autograd("sapiens2::attention", _autograd, setup_context=_setup)


def attention_flops(B: int, N: int, H: int, D: int, S: Optional[int] = None) -> int:
    """QK^T and PV matmul FLOPs of one forward (the ``FlopCounterMode`` convention)."""
    S = N if S is None else S
    return 4 * B * H * N * S * D


@register_flop_formula(torch.ops.sapiens2.attention, get_raw=True)
def _attention_flop(q, k, v, *args, out_val=None, **kwargs) -> int:
    B, N, H, D = q.shape
    return attention_flops(B, N, H, D)


def attention_backward_flops(B: int, N: int, H: int, D: int, deterministic: bool = False) -> int:
    """The N x N x D GEMMs the backward executes: S and dP recomputed, dV, dK and dQ (5, as
    FlashAttention-2/3 and torch's SDPA formula count); the deterministic path recomputes S and dP
    once more for dQ (7)."""
    return attention_flops(B, N, H, D) // 2 * (7 if deterministic else 5)


@register_flop_formula(torch.ops.sapiens2.attention_backward, get_raw=True)
def _attention_bwd_flop(do, q, k, v, o, lse, qw, kw, sin, cos, p, seq_lens, scale, eps, deterministic=False,
                        *args, out_val=None, **kwargs) -> int:
    B, N, H, D = q.shape
    return attention_backward_flops(B, N, H, D, bool(deterministic))


def check_attention_options(ref_name: str, ref: Tensor, B: int, N: int, D: int, q_norm_weight, k_norm_weight, rope,
                            num_prefix_tokens: int, seq_lens, scale, check_values: bool):
    """The keyword arguments every attention entry point shares (``attention``, ``attention_qkv``,
    ``attention_projected``), checked against ``ref`` (the activations, named ``ref_name``) with
    ``B`` samples of ``N`` tokens and head dim ``D``. Returns ``(sin, cos, scale)``."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must be given together")
    if q_norm_weight is not None:
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            check_float(name, w)
            check_shape(name, w, (D,))
        check_same_device(**{ref_name: ref}, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    sin, cos = (None, None) if rope is None else rope
    check_rope(sin, cos, B, N, D, num_prefix_tokens, ref)
    if seq_lens is not None:
        check_seq_lens(seq_lens, B, N, ref, check_values)
    return sin, cos, 1.0 / math.sqrt(D) if scale is None else float(scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_norm_weight: Optional[Tensor] = None,
    k_norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-6,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    num_prefix_tokens: int = 0,
    seq_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
    deterministic: Optional[bool] = None,
    check_values: bool = True,
) -> Tensor:
    """``softmax(q k^T * scale) v`` per head with GQA, optional norm + RoPE prologue; see module doc.

    ``deterministic``: a backward without atomics (bitwise reproducible, 7 instead of 5 N x N x D
    GEMMs); ``None`` follows ``sapiens2.ops.set_deterministic`` / ``torch.use_deterministic_algorithms``.
    ``check_values``: check the values of ``seq_lens`` (one device sync; skipped while compiling);
    callers that validated them already (the model, once per forward) pass ``False``."""
    B, N, H, Hkv, D = check_heads(q, k, v)
    sin, cos, scale = check_attention_options("q", q, B, N, D, q_norm_weight, k_norm_weight, rope, num_prefix_tokens,
                                              seq_lens, scale, check_values)
    o, _ = torch.ops.sapiens2.attention(
        q, k, v, q_norm_weight, k_norm_weight, sin, cos, int(num_prefix_tokens), seq_lens, scale, float(norm_eps),
        determinism.resolve(deterministic),
    )
    return o
