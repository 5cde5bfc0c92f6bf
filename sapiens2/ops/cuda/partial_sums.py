"""CUDA adapter for ``partial_sums`` (kernel: ``s2_column_sum`` in ``csrc/kernels/rms_norm.cu``, the
reduction that finishes every weight-gradient of the CUDA kernels): fp32 partials -> column sums
rounded once to ``dtype``.

The kernel gives each column one thread that walks the rows in order: right for the few partial
rows per SM the CUDA backwards write, slow for tall buffers (the 4K tokenizer's per-window bias
partials: thousands of rows, a few thousand columns, a few dozen blocks). Those go to the Triton
kernel on GPU tensors, which splits the rows over programs (the emulation keeps them here)."""

from __future__ import annotations

import torch

from . import ops


TALL_ROWS = 1024


def goes_to_triton(part) -> bool:
    return part.device.type == "cuda" and part.shape[0] > TALL_ROWS


def partial_sums(part, dtype):
    if part.dtype != torch.float32:  # the float64 reference path never reaches a kernel
        return part.sum(0).to(dtype)
    if goes_to_triton(part):
        from .. import _triton

        return _triton.partial_sums(part, dtype)
    return ops().partial_sums(part.contiguous(), dtype)


def register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::partial_sums")
    def _(part, dtype):
        return part.new_empty(part.shape[1:], dtype=dtype)
