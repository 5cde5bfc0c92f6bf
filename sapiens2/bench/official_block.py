"""A transformer block written the way the newest official Sapiens2 code writes it (plain PyTorch ops),
for costing side by side with ours: ``nn.RMSNorm``, separate q/k/v projections viewed and permuted to
``(B, heads, N, D)``, per-head RMSNorm, rotate-half RoPE with ``torch.cat`` of the prefix tokens,
``scaled_dot_product_attention`` with native GQA (``enable_gqa=True``; ``native_gqa=False`` gives the
first release's ``repeat_interleave`` copies), permute + reshape back, output projection,
LayerScale, residual adds, SwiGLU FFN (``w12`` -> chunk -> ``silu(a) * b`` -> ``w3``), all in bf16.

``gpu_like=True`` costs it the way PyTorch runs it on a GPU: ``nn.RMSNorm`` and SDPA's flash kernels
are single custom ops in the ``sapiens2_cost`` namespace (fake implementations, FLOP formulas) whose
launch plans (``plans_official.py``) list the kernels PyTorch launches for them; on the CPU both
would decompose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

# the stand-ins compute what the ops' reference implementations compute; only their kernel count differs
from ..ops._checks import stat_dtype
from ..ops._sdpa_ref import sdpa_bwd, sdpa_fwd
from ..ops.rms_norm import _rms_norm_bwd_ref, _rms_norm_ref

# ------------------------------------------------------------------------------------ one-kernel stand-ins


@torch.library.custom_op("sapiens2_cost::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _rms_norm_ref(x, w, eps)


@fused_rms_norm.register_fake
def _(x, w, eps):
    # PyTorch's kernel makes X contiguous first: Y (and rstd) come out contiguous whatever x's strides
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=stat_dtype(x))


@torch.library.custom_op("sapiens2_cost::fused_rms_norm_backward", mutates_args=())
def fused_rms_norm_backward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return _rms_norm_bwd_ref(dy, x, w, rstd)


@fused_rms_norm_backward.register_fake
def _(dy, x, w, rstd):
    return x.new_empty(x.shape), torch.empty_like(w)


def _rms_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _rms_bwd(ctx, dy, _):
    x, w, rstd = ctx.saved_tensors
    dx, dw = torch.ops.sapiens2_cost.fused_rms_norm_backward(dy, x, w, rstd)
    return dx, dw, None


fused_rms_norm.register_autograd(_rms_bwd, setup_context=_rms_setup)


def _expand_kv(t: Tensor, H: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): only for computing the stand-in's value (native GQA costs no copy)."""
    return t.repeat_interleave(H // t.shape[1], dim=1) if t.shape[1] != H else t


@torch.library.custom_op("sapiens2_cost::flash_sdpa", mutates_args=())
def flash_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """SDPA's flash kernel, native GQA (k, v may have fewer heads than q); ``scale`` from the unpadded D."""
    H = q.shape[1]
    return sdpa_fwd(q, _expand_kv(k, H), _expand_kv(v, H), None, scale)


@flash_sdpa.register_fake
def _(q, k, v, scale):
    # PyTorch's flash path allocates the output like (the transposed) q, so with the official
    # contiguous (B, H, N, D) q the permute + reshape back to (B, N, C) is a real copy, as on a GPU
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=stat_dtype(q))


@torch.library.custom_op("sapiens2_cost::flash_sdpa_backward", mutates_args=())
def flash_sdpa_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    dq, dk, dv = sdpa_bwd(do, q, _expand_kv(k, H), _expand_kv(v, H), o, lse, None, scale)
    if Hkv != H:  # the expanded gradients summed over each group, as mha_bwd does
        dk = dk.reshape(B, Hkv, H // Hkv, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, H // Hkv, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@flash_sdpa_backward.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (rstd, lse) get no zero-filled gradient kernel
    ctx.scale = inputs[3]
    ctx.save_for_backward(*inputs[:3], *output)


def _sdpa_bwd(ctx, do, _):
    q, k, v, o, lse = ctx.saved_tensors
    return (*torch.ops.sapiens2_cost.flash_sdpa_backward(do, q, k, v, o, lse, ctx.scale), None)


flash_sdpa.register_autograd(_sdpa_bwd, setup_context=_sdpa_setup)


@register_flop_formula(torch.ops.sapiens2_cost.flash_sdpa, get_raw=True)
def _flash_flop(q, k, v, *args, out_val=None, **kw) -> int:
    B, H, N, D = q.shape
    return 4 * B * H * N * k.shape[2] * D


@register_flop_formula(torch.ops.sapiens2_cost.flash_sdpa_backward, get_raw=True)
def _flash_bwd_flop(do, q, k, v, *args, out_val=None, **kw) -> int:
    B, H, N, D = q.shape
    return 10 * B * H * N * k.shape[2] * D


# ------------------------------------------------------------------------------------ the block


class _Norm(nn.Module):
    def __init__(self, dim: int, gpu_like: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.gpu_like = gpu_like

    def forward(self, x):
        if self.gpu_like:
            return torch.ops.sapiens2_cost.fused_rms_norm(x, self.weight, 1e-6)[0]
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


# OfficialStyleBlock parameter -> the same parameter of our Block
_OURS_NAMES = {"ln1.weight": "ln1.weight", "ln2.weight": "ln2.weight", "gamma": "attn.gamma.weight",
               "q_norm.weight": "attn.q_norm.weight", "k_norm.weight": "attn.k_norm.weight",
               **{f"{m}.{p}": f"attn.{m}.{p}" for m in ("wq", "wk", "wv", "proj") for p in ("weight", "bias")},
               **{f"{m}.{p}": f"ffn.{m}.{p}" for m in ("w12", "w3") for p in ("weight", "bias")}}


class OfficialStyleBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn_hidden: int, gpu_like: bool = True,
                 tokenizer_layer: bool = False, native_gqa: bool = True):
        super().__init__()
        self.h, self.hkv, self.d = num_heads, num_kv_heads, dim // num_heads
        self.gpu_like = gpu_like
        # the newest official code hands K/V with fewer heads to SDPA (enable_gqa=True); the first
        # release copied them with repeat_interleave
        self.native_gqa = native_gqa
        self.tokenizer_layer = tokenizer_layer  # the tokenizer's layers: no QK-norm, RoPE or LayerScale
        self.ln1, self.ln2 = _Norm(dim, gpu_like), _Norm(dim, gpu_like)
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, num_kv_heads * self.d)
        self.wv = nn.Linear(dim, num_kv_heads * self.d)
        self.q_norm, self.k_norm = _Norm(self.d, gpu_like), _Norm(self.d, gpu_like)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-4))
        self.w12 = nn.Linear(dim, 2 * ffn_hidden)
        self.w3 = nn.Linear(ffn_hidden, dim)

    @classmethod
    def from_ours(cls, block, gpu_like: bool = True) -> "OfficialStyleBlock":
        """The official-style twin of a trunk ``sapiens2.models.layers.Block``: same shapes, device and
        dtype, and (off the meta device) the same weights, so both compute the same function."""
        a, w = block.attn, next(block.parameters())
        with torch.device(w.device):
            off = cls(a.wqkv.in_features, a.num_heads, a.num_kv_heads, block.ffn.w3.in_features, gpu_like).to(w.dtype)
        if w.device.type != "meta":
            ours = block.state_dict()
            off.load_state_dict({k: ours[v] for k, v in _OURS_NAMES.items()}, strict=True)
        return off

    @staticmethod
    def _rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def _rope(self, x, sin, cos):
        # one slice used twice, as the official code does: its gradients meet before one slice_backward
        p = x.shape[-2] - sin.shape[-2]
        xr = x[:, :, p:]
        return torch.cat([x[:, :, :p], xr * cos + self._rotate_half(xr) * sin], dim=-2)

    def attn(self, x, sin, cos):
        B, N, C = x.shape
        q = self.wq(x).view(B, N, self.h, self.d).permute(0, 2, 1, 3)
        k = self.wk(x).view(B, N, self.hkv, self.d).permute(0, 2, 1, 3)
        v = self.wv(x).view(B, N, self.hkv, self.d).permute(0, 2, 1, 3)
        if not self.tokenizer_layer:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.hkv != self.h and not self.native_gqa:
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        if sin is not None:
            q, k = self._rope(q, sin, cos), self._rope(k, sin, cos)
        if self.gpu_like:
            D = q.shape[-1]
            pad = -D % 8
            if pad:  # SDPA pads the head dim to a multiple of 8 for the flash kernel, and slices the output
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
            o = torch.ops.sapiens2_cost.flash_sdpa(q, k, v, D ** -0.5)[0]
            if pad:
                o = o[..., :D]
        else:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.hkv != self.h)
        o = o.permute(0, 2, 1, 3).reshape(B, N, C)
        return self.proj(o) if self.tokenizer_layer else self.proj(o) * self.gamma

    def forward(self, x, sin=None, cos=None):
        x = x + self.attn(self.ln1(x), sin, cos)
        a, b = self.w12(self.ln2(x)).chunk(2, dim=-1)
        return x + self.w3(F.silu(a) * b)


class OfficialStyleTokenizer(nn.Module):
    """The official window tokenizer: permute the grid into windows (a copy), then per chunk of
    windows: prepend the CLS, add the local position embedding, run every layer on all 1 + w*w
    tokens, keep the CLS row; in training each chunk is checkpointed (recomputed in backward)."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, window: int = 4, chunk: int = 1024,
                 gpu_like: bool = True):
        super().__init__()
        self.w, self.chunk = window, chunk
        self.local_pos_embed = nn.Parameter(torch.zeros(1, 1 + window * window, dim))
        self.w_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(OfficialStyleBlock(dim, num_heads, num_heads, 4 * dim, gpu_like, True)
                                    for _ in range(num_layers))

    def _run(self, t):
        for blk in self.blocks:
            t = blk(t)
        return t

    def forward(self, x, hw):
        from torch.utils.checkpoint import checkpoint

        B, N, C = x.shape
        H, W = hw
        w = self.w
        x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w * w, C)
        out = x.new_empty(x.shape[0], C)
        for i in range(0, x.shape[0], self.chunk):
            c = x[i: i + self.chunk]
            c = torch.cat([self.w_cls.expand(c.shape[0], -1, -1), c], dim=1) + self.local_pos_embed
            c = checkpoint(self._run, c, use_reentrant=False) if self.training else self._run(c)
            out[i: i + c.shape[0]] = c[:, 0]
        return out.view(B, -1, C)
