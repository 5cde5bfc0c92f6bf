"""CUDA adapter for ``partial_sums`` (kernel: ``s2_column_sum`` in ``csrc/kernels/rms_norm.cu``, the
reduction that finishes every weight-gradient of the CUDA kernels): fp32 partials -> column sums
rounded once to ``dtype``."""

from __future__ import annotations

import torch

from . import ops


def partial_sums(part, dtype):
    if part.dtype != torch.float32:  # the float64 reference path never reaches a kernel
        return part.sum(0).to(dtype)
    return ops().partial_sums(part.contiguous(), dtype)


def register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::partial_sums")
    def _(part, dtype):
        return part.new_empty(part.shape[1:], dtype=dtype)
