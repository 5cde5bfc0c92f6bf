"""``partial_sums``: finish an fp32 buffer of per-program partial sums (a weight or bias gradient) in
one launch: column sums over its rows, accumulated in fp32 and rounded once to ``dtype``.

The reference is ``part.sum(0).to(dtype)`` (two kernels on a GPU); the Triton backend runs one
kernel (``sapiens2.kernels.column_sum``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend


@torch.library.custom_op("sapiens2::partial_sums", mutates_args=())
def partial_sums(part: Tensor, dtype: torch.dtype) -> Tensor:
    """``part`` (R, C) fp32 (fp64 on the float64 reference path) -> (C,) in ``dtype``."""
    if part.dim() != 2 or part.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"part must be a (rows, columns) float32 tensor, got {tuple(part.shape)} {part.dtype}")
    impl = backend.select("partial_sums", part)
    if impl == "reference":
        return part.sum(0).to(dtype)
    return impl(part, dtype)


@partial_sums.register_fake
def _(part, dtype):
    return part.new_empty(part.shape[1:], dtype=dtype)
