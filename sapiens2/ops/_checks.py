"""Input validation shared by the ops: clear errors that name the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of saved statistics (rstd, lse) and of accumulation: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int | tuple[int, ...], what: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in allowed:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; put them on one device")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check of ``t``'s values may run here: not on the meta device and not while
    ``torch.compile`` traces (a data-dependent check there is a graph break and a host sync; compiled
    callers validate once, eagerly, before the compiled region)."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def check_seq_lens(seq_lens, B: int, N: int, ref: torch.Tensor, check_values: bool = True) -> None:
    """``(B,)`` int32/int64 valid lengths in [1, N] on ``ref``'s device. The value check syncs with the
    device once; ``check_values=False`` skips it for callers that validated already."""
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens must be an int32/int64 tensor of shape (B,), got {seq_lens!r:.80}")
    check_shape("seq_lens", seq_lens, (B,))
    check_same_device(q=ref, seq_lens=seq_lens)
    if check_values and values_checkable(seq_lens) and bool(((seq_lens < 1) | (seq_lens > N)).any()):
        raise ValueError(f"seq_lens must be in [1, N={N}], got {seq_lens.tolist()}")
