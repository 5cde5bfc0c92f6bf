"""AdamW parameter groups: layer-wise lr decay, weight-decay exclusions, per-step values.

Each parameter gets a group with ``lr_scale`` and ``wd_scale``; every step the trainer writes
``lr = lr_schedule[step] * lr_scale`` and ``weight_decay = wd_schedule[step] * wd_scale`` into the
groups. Parameters are grouped by (lr_scale, wd_scale) so the fused/foreach kernels see few groups.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from .config import OptimConfig

# wrapper prefixes that activation checkpointing and torch.compile insert into parameter names
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module\.|_orig_mod\.|_fsdp_wrapped_module\.)")
# tokens and position embeddings: no weight decay (DINOv3 / MAE)
_NO_DECAY_NAMES = ("cls_token", "storage_tokens", "mask_token", "local_pos_embed", "w_cls", "pos_embed")


def clean_name(name: str) -> str:
    return _WRAPPERS.sub("", name)


def decays(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights and LayerScale (every 1-D parameter) and the learned tokens get none."""
    return p.ndim > 1 and not any(t in name.split(".")[-1] for t in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, cfg: OptimConfig, layer_of: Callable[[str], int], num_layers: int,
                 lr_mult: Callable[[str], float] = lambda n: 1.0) -> list[dict]:
    """Groups for ``torch.optim.AdamW``: ``layer_of(name)`` in ``[0, num_layers + 1]``."""
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(name)
        layer = layer_of(name)
        lr_scale = cfg.layerwise_decay ** (num_layers + 1 - layer) * lr_mult(name)
        wd_scale = 1.0 if decays(name, p) else 0.0
        g = groups.setdefault((lr_scale, wd_scale), {"params": [], "lr_scale": lr_scale, "wd_scale": wd_scale,
                                                     "lr": 0.0, "weight_decay": 0.0})
        g["params"].append(p)
    return list(groups.values())


def build_adamw(groups: Iterable[dict], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused on CUDA when ``cfg.fused`` (one kernel for every parameter), foreach elsewhere."""
    fused = cfg.fused and device_type == "cuda"
    return torch.optim.AdamW(list(groups), lr=0.0, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0,
                             fused=fused or None, foreach=None if fused else True)


def set_step_values(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
        g["weight_decay"] = wd * g["wd_scale"]


@torch.no_grad()
def init_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Create every parameter's AdamW state now — exactly what AdamW creates lazily at a parameter's
    first step (step 0, zero moments) — so that a checkpoint always holds the full state. Without it a
    parameter that has had no gradient yet (the DINO head's frozen last layer) has no state, and a
    resumed run would differ from the uninterrupted one (DCP fills the missing state with a dummy step)."""
    from torch.optim.optimizer import _get_scalar_dtype

    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            on_device = group.get("capturable") or group.get("fused")
            state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
                             if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype()))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
