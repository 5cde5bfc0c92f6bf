"""Checkpoint reading (safetensors; pickle only when the caller trusts the file) and arch inference."""

from __future__ import annotations

import os
import re

import torch

from .models.config import ARCH_ZOO, ArchConfig

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def load_checkpoint(path: "str | os.PathLike", trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint into ``dict[str, Tensor]`` on the CPU.

    ``.safetensors`` files are read directly. Pickle-based files (``.pt``, ``.pth``, ``.bin``, ...)
    can run arbitrary code when loaded, so they are refused unless ``trust_pickle=True``; even then
    they are read with ``weights_only=True``. A wrapping ``{"state_dict": ...}`` and a
    ``backbone.`` key prefix (training checkpoints) are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    elif path.endswith(PICKLE_SUFFIXES):
        if not trust_pickle:
            raise ValueError(
                f"{path} is a pickle file, which can execute code when loaded; convert it to .safetensors, "
                "or pass trust_pickle=True if you trust its source"
            )
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unknown checkpoint format for {path}: expected .safetensors (or {', '.join(PICKLE_SUFFIXES)})")
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    if sd and all(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items()}
    return sd


def infer_config(sd: dict[str, torch.Tensor]) -> tuple[ArchConfig, bool]:
    """The ``ArchConfig`` (a zoo entry when the shapes match one) and ``use_tokenizer`` of a state dict."""
    for k in ("cls_token", "storage_tokens", "blocks.0.attn.q_norm.weight"):
        if k not in sd:
            raise ValueError(f"not a Sapiens2 backbone state dict: key {k!r} is missing")
    C = sd["cls_token"].shape[-1]
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    L = layers[-1] + 1
    heads = C // head_dim
    kv = [sd[f"blocks.{i}.attn.wk.weight"].shape[0] // head_dim for i in range(L)]
    gqa = [i for i in range(L) if kv[i] != heads]
    mha_early = gqa[0] if gqa else L
    mha_late = L - 1 - gqa[-1] if gqa else 0
    ratio = heads // kv[gqa[0]] if gqa else 2
    tok_layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"tokenizer\.blocks\.(\d+)\.", k))})
    use_tokenizer = bool(tok_layers)
    window = int(round((sd["tokenizer.local_pos_embed"].shape[1] - 1) ** 0.5)) if use_tokenizer else 4
    fields = dict(
        embed_dims=C, num_layers=L, num_heads=heads,
        ffn_ratio=sd["blocks.0.ffn.w12.weight"].shape[0] // 2 // C,
        mha_early=mha_early, mha_late=mha_late, gqa_kv_ratio=ratio,
        n_storage_tokens=sd["storage_tokens"].shape[1], window_size=window,
    )
    for cfg in ARCH_ZOO.values():
        same = all(getattr(cfg, f) == v for f, v in fields.items() if not (not gqa and f in ("mha_early", "mha_late")))
        if same and (not use_tokenizer or cfg.num_tokenizer_layers == len(tok_layers)):
            if not gqa and cfg.gqa_layers():
                continue
            return cfg, use_tokenizer
    if not gqa:
        fields.update(mha_early=L, mha_late=0)
    return ArchConfig(name="custom", num_tokenizer_layers=len(tok_layers) if use_tokenizer else 2, **fields), use_tokenizer
