"""Backend choice for every ``sapiens2`` op.

Each op has a plain PyTorch *reference* implementation (the definition, any device and dtype),
and may have a *triton* implementation (``sapiens2.kernels``) and a *cuda* one (the compiled
extension ``sapiens2._C``). The choice is made per call, inside the custom op, from:

* ``use_backend(name, strict=False)`` — a context manager forcing ``"reference"``, ``"triton"``,
  ``"cuda"`` or ``"auto"``. An op missing in the forced backend falls back to the reference with a
  one-time warning, or raises ``NotImplementedError`` when ``strict=True``.
* ``"auto"`` (the default) — cuda (extension built, GPU tensors) > triton (GPU tensors) >
  reference. It never picks the Triton interpreter: only an explicit ``use_backend("triton")``
  runs Triton kernels on CPU tensors, and only with ``TRITON_INTERPRET=1`` set. Nor does it pick
  the CUDA emulation: inside ``sapiens2.ops.cuda.emulated()`` (tests) an explicit
  ``use_backend("cuda")`` runs the same CUDA kernel sources on CPU tensors.

Forward ops return the same saved values whatever the backend (e.g. the fp32 inverse RMS), so a
backward may run on another backend than its forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")

_current: contextvars.ContextVar[tuple[str, bool]] = contextvars.ContextVar(
    "sapiens2_backend", default=("auto", False)
)

# op name -> callable, filled by the op modules with lazy loaders so that importing sapiens2
# never imports triton or the extension.
_IMPLS: dict[str, dict[str, Callable[[], Callable]]] = {"triton": {}, "cuda": {}}
_warned: set[tuple[str, str]] = set()


@contextlib.contextmanager
def use_backend(name: str, strict: bool = False) -> Iterator[None]:
    """Force the backend of every ``sapiens2`` op called inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    token = _current.set((name, bool(strict)))
    try:
        yield
    finally:
        _current.reset(token)


def current_backend() -> tuple[str, bool]:
    """The (name, strict) pair in force."""
    return _current.get()


def register_impl(op: str, backend: str, module: str, attr: str) -> None:
    """Declare that ``backend`` implements ``op`` with ``module.attr``, imported on first use."""
    _IMPLS[backend][op] = lambda: getattr(importlib.import_module(module), attr)


def has_impl(op: str, backend: str) -> bool:
    return backend == "reference" or op in _IMPLS.get(backend, {})


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_extension_available() -> bool:
    try:
        importlib.import_module("sapiens2._C")
    except Exception:
        return False
    return True


def _cuda_emulated() -> bool:
    from .cuda import is_emulated

    return is_emulated()


def _runnable(backend: str, on_gpu: bool) -> tuple[bool, str]:
    if backend == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if on_gpu or interpreter_enabled():
            return True, ""
        return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if backend == "cuda":
        if _cuda_emulated():  # tests: the same kernels through the CPU emulation, on CPU tensors
            return (not on_gpu), "the emulated CUDA kernels run on CPU tensors"
        if not cuda_extension_available():
            return False, "the compiled extension sapiens2._C is not built"
        if on_gpu:
            return True, ""
        return False, "the CUDA kernels need CUDA tensors"
    return True, ""


def select(op: str, *tensors: torch.Tensor | None) -> str | Callable:
    """Return ``"reference"`` or the implementation callable for ``op`` on these tensors."""
    name, strict = _current.get()
    on_gpu = any(t is not None and t.is_cuda for t in tensors)
    if name == "reference":
        return "reference"
    if name == "auto":
        for backend in ("cuda", "triton"):
            if op in _IMPLS[backend] and on_gpu and _runnable(backend, on_gpu)[0]:
                return _IMPLS[backend][op]()
        return "reference"
    if op not in _IMPLS[name]:
        reason = f"op {op!r} has no {name} implementation"
    else:
        ok, reason = _runnable(name, on_gpu)
        if ok:
            return _IMPLS[name][op]()
    if strict:
        raise NotImplementedError(f"use_backend({name!r}, strict=True): {reason}")
    if (op, name) not in _warned:
        _warned.add((op, name))
        warnings.warn(f"sapiens2: {reason}; falling back to the reference implementation", stacklevel=3)
    return "reference"


def available_backends() -> dict[str, str]:
    """Human-readable availability of each backend on this machine (for ``sapiens2 info``)."""
    gpu = torch.cuda.is_available()
    out = {"reference": "available"}
    if not triton_available():
        out["triton"] = "unavailable: triton not installed"
    elif gpu:
        out["triton"] = f"available ({len(_IMPLS['triton'])} ops)"
    else:
        out["triton"] = f"installed, {len(_IMPLS['triton'])} ops; no GPU (interpreter only via use_backend('triton'))"
    if cuda_extension_available():
        out["cuda"] = f"built, {len(_IMPLS['cuda'])} ops" + ("" if gpu else "; not runnable without a GPU")
    else:
        out["cuda"] = "not built"
    return out
