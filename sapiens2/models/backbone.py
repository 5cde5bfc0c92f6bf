"""``Sapiens2Backbone``: every official Sapiens2 variant (0.1B-5B, and the 4K tokenizer form),
loading official checkpoints with identical outputs, built on ``sapiens2.ops``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from ..ops._checks import check_seq_lens, values_checkable
from .config import ArchConfig, get_arch
from .layers import Block, RMSNorm, linear_patch_embed, reset_weights, settle
from .rope import Rope2D
from .tokenizer import WindowTokenizer

OUT_TYPES = ("raw", "cls_token", "featmap")
ROPE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)


class Sapiens2Backbone(nn.Module):
    """Sapiens2 vision transformer backbone.

    Args:
        arch: a zoo name (``"sapiens2_0.4b"``, ...) or an :class:`ArchConfig`.
        img_size: nominal (H, W) input size; any size divisible by the patch size (times the
            window with the tokenizer) works at run time.
        use_tokenizer: the 4K hierarchical form (window tokenizer in front of the trunk).
        out_type: ``"raw"`` (final-normed tokens ``(B, 1 + 8 + h*w, C)``), ``"cls_token"``
            (``(B, C)``) or ``"featmap"`` (``(B, C, h, w)``).
        rope_dtype: ``"bf16"`` (official default: RoPE tables in bf16, q and k rounded through
            bf16 on the reference path) or ``"fp32"``.
        fused_attention: QK-norm + RoPE fused into the attention op (default), or the separate
            ``qk_norm_rope`` op followed by plain attention.
        device, dtype: where and how to build; ``device="meta"`` describes a model without
            allocating it (then ``to_empty(device=...)`` and ``init_weights()``).
    """

    def __init__(
        self,
        arch: "str | ArchConfig" = "sapiens2_1b",
        img_size: Sequence[int] | int = (1024, 768),
        patch_size: int = 16,
        in_channels: int = 3,
        use_tokenizer: bool = False,
        out_type: str = "raw",
        final_norm: bool = True,
        rope_dtype: str = "bf16",
        fused_attention: bool = True,
        layer_scale_init: float = 1e-4,
        device: "torch.device | str | None" = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        cfg = get_arch(arch)
        if out_type not in OUT_TYPES:
            raise ValueError(f"out_type must be one of {OUT_TYPES}, got {out_type!r}")
        if rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"rope_dtype must be one of {tuple(ROPE_DTYPES)}, got {rope_dtype!r}")
        self.arch = cfg
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_type = out_type
        self.use_tokenizer = use_tokenizer
        self.num_prefix_tokens = 1 + cfg.n_storage_tokens
        self.embed_dims = cfg.embed_dims
        self.layer_scale_init = layer_scale_init
        C = cfg.embed_dims
        factory = torch.device(device) if device is not None else torch.get_default_device()
        with factory:
            self.patch_embed = PatchEmbed(in_channels, C, patch_size)
            self.rope_embed = Rope2D(cfg.head_dim, cfg.rope_base, ROPE_DTYPES[rope_dtype])
            self.tokenizer = (
                WindowTokenizer(C, cfg.num_heads, cfg.num_tokenizer_layers, cfg.window_size, cfg.ffn_ratio)
                if use_tokenizer else None
            )
            self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, C))
            self.blocks = nn.ModuleList(
                Block(C, cfg.num_heads, cfg.num_kv_heads(i), cfg.ffn_hidden, qk_norm=True,
                      layer_scale=layer_scale_init, fused_attention=fused_attention)
                for i in range(cfg.num_layers)
            )
            self.ln1 = RMSNorm(C) if final_norm else None
        if dtype is not None:
            self.to(dtype)  # the RoPE periods keep their own dtype (Rope2D._apply)
        if factory.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: truncated normal (std 0.02) for Linear/Conv weights, the CLS,
        register and tokenizer tokens; zero biases; unit norm weights; LayerScale at its init value."""
        reset_weights(self)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.storage_tokens, std=0.02)
        if self.tokenizer is not None:
            trunc_normal_(self.tokenizer.local_pos_embed, std=0.02)
            trunc_normal_(self.tokenizer.w_cls, std=0.02)
        self.rope_embed.reset_parameters()

    # ------------------------------------------------------------------------------------------ shapes

    @property
    def window(self) -> int:
        return self.arch.window_size if self.tokenizer is not None else 1

    def grids(self, H: int, W: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(patch grid, trunk grid) for an ``H x W`` image, with clear errors for bad sizes."""
        p, w = self.patch_size, self.window
        if H % (p * w) or W % (p * w):
            unit = f"patch size {p}" + (f" x window {w} = {p * w}" if w > 1 else "")
            raise ValueError(f"image size {H}x{W} must be divisible by the {unit}")
        return (H // p, W // p), (H // (p * w), W // (p * w))

    # ------------------------------------------------------------------------------------------ forward

    def embed(self, images: Tensor, visible_ids: Optional[Tensor] = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens for the trunk ``(B, h*w or K, C)`` (through the tokenizer in the 4K form)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must be (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        B, _, H, W = images.shape
        (gh, gw), (th, tw) = self.grids(H, W)
        conv = self.patch_embed.projection
        if visible_ids is None:
            x = conv(images).flatten(2).transpose(1, 2)  # (B, gh*gw, C), the official op sequence
            if self.tokenizer is not None:
                x = self.tokenizer(x, (gh, gw), layout="grid")
            return x, (th, tw)
        self._check_visible(visible_ids, B, th * tw, images.device)
        p, w = self.patch_size, self.window
        # Only the visible patches (windows) are embedded: extract their pixels, then one matmul.
        patches = images.reshape(B, self.in_channels, th, w, p, tw, w, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        patches = patches.reshape(B, th * tw, w * w, self.in_channels * p * p)
        idx = visible_ids[:, :, None, None].expand(-1, -1, w * w, patches.shape[-1])
        x = linear_patch_embed(torch.gather(patches, 1, idx).flatten(1, 2), conv)  # (B, K*w*w, C)
        if self.tokenizer is not None:
            x = self.tokenizer(x, (gh, gw), layout="windows")
        return x, (th, tw)

    def _check_visible(self, ids: Tensor, B: int, n: int, device) -> None:
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"visible_ids must be an int64 tensor (B, K), got {getattr(ids, 'dtype', type(ids))}")
        if ids.dim() != 2 or ids.shape[0] != B or ids.shape[1] < 1:
            raise ValueError(f"visible_ids must be (B={B}, K>=1), got shape {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"visible_ids is on {ids.device} but images are on {device}")
        if values_checkable(ids):  # one device sync per forward; skipped while torch.compile traces
            if bool(((ids < 0) | (ids >= n)).any()):
                raise ValueError(f"visible_ids must index the {n} trunk tokens, got values outside [0, {n})")
            if ids.shape[1] > 1 and bool((ids[:, 1:] <= ids[:, :-1]).any()):
                raise ValueError("visible_ids must be sorted and unique in each row")

    def check_inputs(self, images: Optional[Tensor] = None, visible_ids: Optional[Tensor] = None,
                     seq_lens: Optional[Tensor] = None, num_tokens: Optional[int] = None) -> None:
        """Validate inputs eagerly, values included (one device sync), before a compiled region: inside
        ``torch.compile`` the forward checks shapes and dtypes only, since a data-dependent check there
        would break the graph and sync every call. ``seq_lens`` are checked against ``num_tokens``
        (prefix tokens included), as ``forward_tokens`` takes them."""
        if images is not None:
            if images.dim() != 4 or images.shape[1] != self.in_channels:
                raise ValueError(f"images must be (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}")
            (_, _), (th, tw) = self.grids(images.shape[2], images.shape[3])
            if visible_ids is not None:
                self._check_visible(visible_ids, images.shape[0], th * tw, images.device)
        if seq_lens is not None:
            if num_tokens is None:
                raise ValueError("num_tokens (prefix tokens included) is needed to check seq_lens")
            check_seq_lens(seq_lens, seq_lens.shape[0], int(num_tokens), seq_lens)

    def rope_tables(self, th: int, tw: int, visible_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        sin, cos = self.rope_embed(th, tw)
        if visible_ids is not None:
            sin, cos = sin[visible_ids], cos[visible_ids]  # (B, K, D): the kept positions
        return sin, cos

    def forward_tokens(self, x: Tensor, rope: tuple[Tensor, Tensor], seq_lens: Optional[Tensor] = None) -> Tensor:
        """Run the trunk on patch tokens ``(B, n, C)``; returns final-normed ``(B, 9 + n, C)``.

        ``seq_lens`` ``(B,)``: valid lengths (prefix tokens included) of right-padded samples; their
        values are checked here once (skipped while ``torch.compile`` traces: validate eagerly with
        ``check_seq_lens`` before a compiled region)."""
        B = x.shape[0]
        if seq_lens is not None:
            check_seq_lens(seq_lens, B, self.num_prefix_tokens + x.shape[1], x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x], dim=1)
        h, pending = x, None
        for blk in self.blocks:
            h, pending = blk(h, pending, rope, self.num_prefix_tokens, seq_lens)
        if self.ln1 is None:
            return settle(h, pending)
        return self.ln1(pending, residual=h)[0]

    def forward(self, images: Tensor, visible_ids: Optional[Tensor] = None) -> Tensor:
        """``images`` ``(B, 3, H, W)``; ``visible_ids`` ``(B, K)`` sorted int64 indices of the visible
        trunk tokens (patches, or windows with the tokenizer) — only those are computed."""
        x, (th, tw) = self.embed(images, visible_ids)
        out = self.forward_tokens(x, self.rope_tables(th, tw, visible_ids))
        if self.out_type == "raw":
            return out
        if self.out_type == "cls_token":
            return out[:, 0]
        if visible_ids is not None:
            raise ValueError('out_type="featmap" needs every token; it cannot be used with visible_ids')
        return out[:, self.num_prefix_tokens:].reshape(out.shape[0], th, tw, -1).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, path: str, trust_pickle: bool = False, **kwargs) -> "Sapiens2Backbone":
        """Build the model that the checkpoint's shapes describe, and load it (strict)."""
        from ..checkpoint import infer_config, load_checkpoint

        sd = load_checkpoint(path, trust_pickle=trust_pickle)
        cfg, use_tokenizer = infer_config(sd)
        kwargs.setdefault("use_tokenizer", use_tokenizer)
        kwargs.setdefault("patch_size", int(sd["patch_embed.projection.weight"].shape[-1]))
        model = cls(cfg, device="meta", **kwargs)
        model.to_empty(device="cpu")
        model.load_state_dict(sd, strict=True)
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with errors that list missing/unexpected keys and bad shapes."""
        own = self.state_dict()
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if bad or (strict and (missing or unexpected)):
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
            if bad:
                parts.append(f"shape mismatches ({len(bad)}): {bad[:8]}")
            raise ValueError(
                f"checkpoint does not match {self.arch.name} (use_tokenizer={self.use_tokenizer}): " + "; ".join(parts)
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
