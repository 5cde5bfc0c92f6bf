"""MAE masking as tensor operations: which trunk tokens of each view stay visible.

A new random set per sample and view, one ratio per batch (so every row keeps the same number of
tokens and the batch stays dense). With the 4K tokenizer the trunk tokens are windows, so masking
acts after the local stage: a masked window's pixels never reach any computed token.

Randomness is a function of ``(seed, step, sample index, view)`` only — not of the rank or of the
order in which samples are processed — so a resumed run, or one re-sharded over another number of
ranks, draws the same masks for the same global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .seeding import sample_generator


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept per view: ``int(n * (1 - ratio))`` (MAE's rounding down), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_visible_ids(num_tokens: int, mask_ratio: float, sample_ids: Tensor, *, seed: int, step: int,
                       view: int, device=None) -> Tensor:
    """``(B, K)`` sorted int64 indices of the visible tokens, one row per sample.

    ``sample_ids`` ``(B,)``: global sample indices (the row's identity in the global batch). Each row
    is the first ``K`` entries of a uniformly random permutation of ``range(num_tokens)``, sorted
    (the backbone's ``visible_ids`` contract)."""
    K = num_visible(num_tokens, mask_ratio)
    rows = []
    for sid in sample_ids.tolist():
        g = sample_generator(seed, step, int(sid), stream=("mask", view))
        rows.append(torch.randperm(num_tokens, generator=g)[:K])
    ids = torch.stack(rows).sort(dim=1).values if rows else torch.empty(0, K, dtype=torch.long)
    return ids.to(device) if device is not None else ids


def mask_from_visible(visible_ids: Tensor, num_tokens: int) -> Tensor:
    """``(B, n)`` bool, True where a token is masked (MAE's convention: 1 = removed, reconstructed)."""
    mask = torch.ones(visible_ids.shape[0], num_tokens, dtype=torch.bool, device=visible_ids.device)
    return mask.scatter_(1, visible_ids, False)
