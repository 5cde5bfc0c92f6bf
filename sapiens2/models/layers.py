"""Building blocks of the Sapiens2 backbone. They call ``sapiens2.ops`` (never a kernel).

State-dict names follow the official checkpoints (``ln1``, ``attn.wq``, ``attn.q_norm``,
``attn.gamma``, ``ffn.w12``, ...), so official state dicts load with ``strict=True`` (the q, k, v
projections are one packed parameter ``attn.wqkv`` inside, converted by state-dict hooks).

The residual stream is carried as ``(h, pending)``: ``pending`` is the previous branch output not
yet added to ``h``, so that each residual add is fused with the RMSNorm that follows it
(``sapiens2.ops.rms_norm(..., residual=h)``), across block boundaries too.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class RMSNorm(nn.Module):
    """Weight holder for ``sapiens2.ops.rms_norm``; ``forward`` adds ``x`` (scaled) into the stream."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, x_scale: Optional[Tensor] = None):
        """``x`` alone: ``(norm(x), x)``; with a residual: ``(norm(h), h)``, ``h = residual + x_scale * x``."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.rms_norm(x, self.weight, self.eps, residual=residual, x_scale=x_scale)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-4):
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.full((dim,), init))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, keep_hidden: bool = False, x_b: Optional[Tensor] = None):
        # the hidden activation is recomputed in backward rather than kept (ops.swiglu_ffn), unless
        # this forward is itself a recompute (keep_hidden); x_b: second rows sharing the weights
        return ops.swiglu_ffn(x, self.w12.weight, self.w12.bias, self.w3.weight, self.w3.bias, keep_hidden, x_b)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with optional per-head QK-RMSNorm and 2D RoPE.

    The q, k and v projections are one packed ``wqkv`` Linear (``(H + 2 Hkv) * D`` outputs: one GEMM
    reads the input once, and ``ops.attention_qkv`` consumes its output packed and returns one packed
    gradient). State dicts use the official separate ``wq`` / ``wk`` / ``wv`` keys both ways: loading
    concatenates them, ``state_dict()`` returns row views of ``wqkv`` under those names."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_norm: bool = True,
                 layer_scale: Optional[float] = 1e-4, qkv_bias: bool = True, fused: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.wqkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim, bias=True)
        self.gamma = LayerScale(dim, layer_scale) if layer_scale else None
        self.register_load_state_dict_pre_hook(_merge_qkv)
        self.register_state_dict_post_hook(_split_qkv)

    @property
    def qkv_sizes(self) -> list[int]:
        """Rows of ``wqkv`` that are the q, k and v projections."""
        D = self.head_dim
        return [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D]

    def qkv(self, x: Tensor) -> Tensor:
        """The packed projection ``(B, N, H + 2 Hkv, D)``."""
        B, N, _ = x.shape
        return self.wqkv(x).view(B, N, self.num_heads + 2 * self.num_kv_heads, self.head_dim)

    def packed_qkv_weight(self) -> tuple[Tensor, Optional[Tensor]]:
        """``W_qkv ((H + 2 Hkv) * D, dim)`` and its bias (the parameters themselves: no copy)."""
        return self.wqkv.weight, self.wqkv.bias

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None, num_prefix_tokens: int = 0,
                seq_lens: Optional[Tensor] = None) -> Tensor:
        """Returns the output projection *without* LayerScale (it is fused into the residual add)."""
        B, N, C = x.shape
        qw = self.q_norm.weight if self.q_norm is not None else None
        kw = self.k_norm.weight if self.k_norm is not None else None
        # seq_lens values are validated once per forward by the backbone, not once per layer
        if self.fused or qw is None:
            # projection + attention: the bias gradient comes from the attention kernels' partial sums
            o = ops.attention_projected(x, self.wqkv.weight, self.wqkv.bias, self.num_heads, q_norm_weight=qw,
                                        k_norm_weight=kw, rope=rope, num_prefix_tokens=num_prefix_tokens,
                                        seq_lens=seq_lens, check_values=False)
        else:  # unfused path, kept for comparison: QK-norm + RoPE op, then plain attention
            q, k, v = self.qkv(x).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
            sin, cos = rope if rope is not None else (None, None)
            q, k = ops.qk_norm_rope(q, k, qw, kw, sin, cos, num_prefix_tokens)
            o = ops.attention(q, k, v, seq_lens=seq_lens, check_values=False)
        return self.proj(o.reshape(B, N, C))

    @property
    def x_scale(self) -> Optional[Tensor]:
        return self.gamma.weight if self.gamma is not None else None


_QKV = ("wq", "wk", "wv")
_NATIVE = threading.local()


@contextlib.contextmanager
def native_state_dict():
    """Inside this context ``state_dict()`` / ``load_state_dict()`` use the packed ``wqkv`` keys as they
    are (no official ``wq``/``wk``/``wv`` conversion): what sharded training checkpoints need, since the
    conversion would split and concatenate sharded tensors."""
    before = getattr(_NATIVE, "on", False)
    _NATIVE.on = True
    try:
        yield
    finally:
        _NATIVE.on = before


def _merge_qkv(module: Attention, state_dict, prefix, *args) -> None:
    """Load hook: official ``wq`` / ``wk`` / ``wv`` entries become one ``wqkv`` entry (concatenated)."""
    if getattr(_NATIVE, "on", False):
        return
    for p in ("weight", "bias"):
        keys = [f"{prefix}{m}.{p}" for m in _QKV]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}wqkv.{p}"] = torch.cat([state_dict.pop(k) for k in keys])


def _split_qkv(module: Attention, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: ``wqkv`` is reported as the official ``wq`` / ``wk`` / ``wv`` entries (row views of
    it), in the official key order."""
    keys = {f"{prefix}wqkv.{p}": p for p in ("weight", "bias")}
    if getattr(_NATIVE, "on", False) or not any(k in state_dict for k in keys):
        return
    items = list(state_dict.items())
    state_dict.clear()
    for k, t in items:
        if k in keys:
            for m, part in zip(_QKV, t.split(module.qkv_sizes)):
                state_dict[f"{prefix}{m}.{keys[k]}"] = part
        else:
            state_dict[k] = t


class Block(nn.Module):
    """Pre-norm transformer block: ``x += gamma * attn(ln1(x))``; ``x += ffn(ln2(x))``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn_hidden: int, qk_norm: bool = True,
                 layer_scale: Optional[float] = 1e-4, fused_attention: bool = True):
        super().__init__()
        self.ln1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, num_kv_heads, qk_norm=qk_norm, layer_scale=layer_scale,
                              fused=fused_attention)
        self.ln2 = RMSNorm(dim)
        self.ffn = SwiGLUFFN(dim, ffn_hidden)

    def forward(self, h: Tensor, pending: Optional[Tensor], rope=None, num_prefix_tokens: int = 0,
                seq_lens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(h, pending)`` -> ``(h', ffn_out)``: the residual stream is ``h + pending`` on both sides."""
        y, h = self.ln1(pending, residual=h) if pending is not None else self.ln1(h)
        a = self.attn(y, rope, num_prefix_tokens, seq_lens)
        y, h = self.ln2(a, residual=h, x_scale=self.attn.x_scale)
        return h, self.ffn(y)


@torch.no_grad()
def reset_weights(module: nn.Module) -> None:
    """The official initialisation of the layers inside ``module``: truncated normal (std 0.02) for
    Linear/Conv weights, zero biases, unit RMSNorm weights, LayerScale at its init value. (Learned
    tokens are their owners' business.)"""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, LayerScale):
            nn.init.constant_(m.weight, m.init)


def settle(h: Tensor, pending: Optional[Tensor]) -> Tensor:
    """Materialise the residual stream ``h + pending``."""
    return h if pending is None else h + pending


def linear_patch_embed(patches: Tensor, conv: nn.Conv2d) -> Tensor:
    """Embed pre-extracted ``(..., C_in*p*p)`` patches with a patch-embedding conv's weights."""
    return F.linear(patches, conv.weight.flatten(1), conv.bias)
