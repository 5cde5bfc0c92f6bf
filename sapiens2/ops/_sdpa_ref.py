"""Plain-PyTorch softmax attention on ``(batch, heads, L, D)`` tensors, forward and backward.

The reference implementations of ``attention``, ``window_attention`` and ``cls_pool`` all reduce to
these two functions. Keys are shared by every query of a KV head (``k`` may have fewer heads than
``q`` only through the caller's ``(B, Hkv, G*N, D)`` grouping, so K and V are never copied).
``key_mask`` (broadcastable to ``(batch, heads, L, S)``, True = attend) masks keys.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import stat_dtype as _acc


def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Return ``(o, lse)``; ``o`` in q's dtype, ``lse`` fp32 ``(batch, heads, L)``."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        # The kernel PyTorch's own SDPA runs on the CPU (what the official code gets), with its lse.
        bias = None
        if key_mask is not None:  # this kernel takes an additive mask of q's dtype
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return _zero_empty_rows(o, lse.to(_acc(q)).contiguous(), key_mask)
    s = (q.to(_acc(q)) @ k.to(_acc(q)).transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v.to(_acc(q))
    return _zero_empty_rows(o.to(q.dtype), lse, key_mask)


def _zero_empty_rows(o: Tensor, lse: Tensor, key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """A query with no valid key (a fully masked window) gets output 0 and lse 0, not NaN."""
    if key_mask is None:
        return o, lse
    empty = ~key_mask.any(-1)  # broadcastable to (batch, heads, L)
    return o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, 0.0)


def sdpa_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, key_mask: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 gradients ``(dq, dk, dv)`` of ``softmax(q k^T * scale) v``, recomputing P from ``lse``.

    ``dk``/``dv`` are summed over every query that shares a key (GQA grouping, broadcast batch).
    """
    acc = _acc(q)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None])
    if key_mask is not None:
        p = p.masked_fill(~key_mask, 0.0)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * o.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf
    return dq, _sum_to(dk, k.shape), _sum_to(dv, v.shape)


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Reduce broadcast dimensions (e.g. a key shared by several query batches) back to ``shape``."""
    if tuple(g.shape) == tuple(shape):
        return g
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dim=dims, keepdim=True)

