"""The ``"cuda"`` backend: adapters from the ``sapiens2`` ops to the hand-written CUDA kernels of
the compiled extension ``sapiens2._C`` (ops ``torch.ops.sapiens2_cuda.*``, built from ``csrc/``).

One module per kernel family (``rms_norm``, ``swiglu``, ``qk_norm_rope``, ``window_attention``,
``partial_sums``)
holds the adapters, which take the same arguments and return the same values as the Triton
adapters in ``sapiens2/ops/_triton.py``, and the fake (meta) implementations of its
``sapiens2_cuda`` ops. The extension is imported on first use only.

``emulated()`` points the backend at the same bindings and kernels built for the CPU emulation
(``torch.ops.sapiens2_emu``, see ``sapiens2.cuda_tools.emu_ext``) so that tests run every op
through its CUDA kernel source on CPU tensors.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch

FAMILIES = ("rms_norm", "swiglu", "qk_norm_rope", "window_attention", "partial_sums")

_state = {"namespace": "sapiens2_cuda", "loaded": False}


def is_emulated() -> bool:
    return _state["namespace"] == "sapiens2_emu"


def ops():
    """The op namespace the adapters call (``torch.ops.sapiens2_cuda``, or the emulation's)."""
    if _state["namespace"] == "sapiens2_cuda" and not _state["loaded"]:
        load_extension()
    return getattr(torch.ops, _state["namespace"])


def load_extension() -> None:
    """Import ``sapiens2._C`` (registers ``torch.ops.sapiens2_cuda``) and its fake implementations."""
    importlib.import_module("sapiens2._C")
    from . import fakes

    fakes.register("sapiens2_cuda")
    _state["loaded"] = True


@contextlib.contextmanager
def emulated() -> Iterator[None]:
    """Inside the block the ``"cuda"`` backend runs the CPU-emulated kernels on CPU tensors."""
    from sapiens2.cuda_tools import emu_ext

    emu_ext.load()
    previous = _state["namespace"]
    _state["namespace"] = "sapiens2_emu"
    try:
        yield
    finally:
        _state["namespace"] = previous
