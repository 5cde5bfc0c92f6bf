"""Exact cost accounting of a Sapiens2 backbone: parameters, multiply-adds and FLOPs.

Conventions:

* ``macs_linear_conv`` — multiply-adds of every Linear and the patch-embedding conv in one forward
  pass (biases not counted): the model card's convention.
* ``flops_attention`` — QK^T and PV matmuls, 2 FLOPs per multiply-add.
* ``flops_forward`` = ``2 * macs_linear_conv + flops_attention`` (matmul FLOPs, as
  ``torch.utils.flop_counter`` counts them; norms and element-wise ops count zero).
* ``flops_train_step`` — forward + backward, op by op: every Linear's backward computes the input
  and the weight gradient (2x its forward) except the patch conv, whose input (the image) needs no
  gradient; attention backward is 2.5x its forward (recomputed scores + four gradient matmuls, as
  PyTorch counts SDPA). These are model FLOPs (MFU's numerator); ``hw_flops_train_step`` adds the
  4K tokenizer's forward, recomputed in backward (activation checkpointing).

``schedule="ours"`` counts what this library computes: in the 4K tokenizer's last layer only the
CLS row's query, output projection and FFN are computed. ``schedule="official"`` counts the
official code, which computes all ``1 + w*w`` rows in every tokenizer layer. With an MAE masking
ratio only the visible tokens (windows, with the tokenizer) are embedded and processed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Sequence

from .models.config import ARCH_ZOO, ArchConfig, get_arch

NUM_PREFIX = 9  # CLS + 8 registers


@dataclass
class FlopReport:
    arch: str
    use_tokenizer: bool
    img_size: tuple[int, int]
    batch: int
    mask_ratio: float
    schedule: str
    params: int
    trunk_tokens: int  # tokens per image in the trunk, prefix included
    macs_linear_conv: int
    flops_attention: int
    flops_forward: int
    flops_train_step: int  # model FLOPs (MFU's numerator)
    hw_flops_train_step: int  # executed FLOPs: the 4K tokenizer is recomputed in backward
    macs_tokenizer: int  # part of macs_linear_conv spent in the tokenizer
    flops_attention_tokenizer: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d


def count_params(cfg: ArchConfig, use_tokenizer: bool, patch_size: int = 16, in_channels: int = 3) -> int:
    C, F, hd = cfg.embed_dims, cfg.ffn_hidden, cfg.head_dim

    def block(kv_dim: int, qk_norm: bool, layer_scale: bool) -> int:
        attn = (C * C + C) + 2 * (C * kv_dim + kv_dim) + (C * C + C)
        return attn + (2 * hd if qk_norm else 0) + (C if layer_scale else 0) + 2 * C + (C * 2 * F + 2 * F) + (F * C + C)

    n = in_channels * patch_size**2 * C + C  # patch embedding
    n += C + cfg.n_storage_tokens * C + C  # cls, registers, final norm
    n += sum(block(cfg.num_kv_heads(i) * hd, True, True) for i in range(cfg.num_layers))
    if use_tokenizer:
        w2 = cfg.window_size**2
        n += (1 + w2) * C + C + cfg.num_tokenizer_layers * block(C, False, False)
    return n


def count_flops(
    arch: "str | ArchConfig",
    img_size: Sequence[int] = (1024, 768),
    batch: int = 1,
    use_tokenizer: bool = False,
    mask_ratio: float = 0.0,
    patch_size: int = 16,
    in_channels: int = 3,
    schedule: str = "ours",
) -> FlopReport:
    cfg = get_arch(arch)
    if schedule not in ("ours", "official"):
        raise ValueError(f"schedule must be 'ours' or 'official', got {schedule!r}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    H, W = img_size
    w = cfg.window_size if use_tokenizer else 1
    if H % (patch_size * w) or W % (patch_size * w):
        raise ValueError(f"image size {H}x{W} must be divisible by {patch_size * w}")
    C, F, hd = cfg.embed_dims, cfg.ffn_hidden, cfg.head_dim
    n_trunk = (H // (patch_size * w)) * (W // (patch_size * w))
    visible = n_trunk - int(round(mask_ratio * n_trunk))
    T = NUM_PREFIX + visible

    patch_macs = visible * w * w * in_channels * patch_size**2 * C
    trunk_macs = 0
    for i in range(cfg.num_layers):
        kv = cfg.num_kv_heads(i) * hd
        trunk_macs += T * (2 * C * C + 2 * C * kv + 3 * C * F)
    trunk_attn = cfg.num_layers * 4 * T * T * C

    tok_macs = tok_attn = 0
    if use_tokenizer:
        S = 1 + w * w
        per_layer = S * (4 * C * C + 3 * C * F)
        full_attn = 4 * S * S * C
        Lt = cfg.num_tokenizer_layers
        if schedule == "official":
            tok_macs = visible * Lt * per_layer
            tok_attn = visible * Lt * full_attn
        else:  # last layer: k, v for all S rows; q, proj, FFN for the CLS row only
            last = S * 2 * C * C + (2 * C * C + 3 * C * F)
            tok_macs = visible * ((Lt - 1) * per_layer + last)
            tok_attn = visible * ((Lt - 1) * full_attn + 4 * S * C)

    linear_macs = trunk_macs + tok_macs
    macs = batch * (patch_macs + linear_macs)
    attn = batch * (trunk_attn + tok_attn)
    fwd = 2 * macs + attn
    # backward: 2x forward for every Linear (input + weight gradients), weight gradient only for the conv
    train = fwd + batch * (4 * linear_macs + 2 * patch_macs) + attn * 5 // 2
    recompute = batch * (2 * tok_macs + tok_attn)  # the tokenizer's forward, again in backward
    return FlopReport(
        arch=cfg.name, use_tokenizer=use_tokenizer, img_size=(H, W), batch=batch, mask_ratio=mask_ratio,
        schedule=schedule, params=count_params(cfg, use_tokenizer, patch_size, in_channels), trunk_tokens=T,
        macs_linear_conv=macs, flops_attention=attn, flops_forward=fwd, flops_train_step=train,
        hw_flops_train_step=train + recompute,
        macs_tokenizer=batch * tok_macs, flops_attention_tokenizer=batch * tok_attn,
    )


def model_card() -> list[dict]:
    with open(os.path.join(os.path.dirname(__file__), "data", "model_card.json")) as f:
        return json.load(f)["rows"]


def zoo_table(schedule: str = "official") -> list[dict]:
    """Every released variant beside the published model card, with residuals in percent."""
    rows = []
    for card in model_card():
        rep = count_flops(card["arch"], tuple(card["img_size_hw"]), use_tokenizer=card["use_tokenizer"], schedule=schedule)
        d = rep.to_dict()
        d["model"] = card["model"]
        d["params_published_B"] = card["params_published_B"]
        d["flops_published_T"] = card["flops_published_T"]
        d["params_residual_pct"] = round(100 * (rep.params / 1e9 - card["params_published_B"]) / card["params_published_B"], 3)
        pub = card["flops_published_T"]
        d["macs_residual_pct"] = None if pub is None else round(100 * (rep.macs_linear_conv / 1e12 - pub) / pub, 2)
        rows.append(d)
    return rows


ZOO = tuple(ARCH_ZOO)
