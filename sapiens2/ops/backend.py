"""Backend choice for every ``sapiens2`` op.

Each op has a plain PyTorch *reference* implementation (the definition, any device and dtype),
and may have a *triton* implementation (``sapiens2.kernels``) and a *cuda* one (the compiled
extension ``sapiens2._C``). The choice is made per call, inside the custom op, from:

* ``use_backend(name, strict=False)`` — a context manager forcing ``"reference"``, ``"triton"``,
  ``"cuda"`` or ``"auto"``. An op missing in the forced backend falls back to the reference with a
  one-time warning, or raises ``NotImplementedError`` when ``strict=True``. The setting is process
  wide, like ``torch.backends`` flags (autograd runs CUDA backwards on its own threads, which must
  see it), and each op's backward runs under the setting in force at its forward.
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
import functools
import importlib
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")

# (name, strict): a plain module global, not a context variable: autograd's device threads and
# torch.compile (which guards on it) read it
_state: tuple[str, bool] = ("auto", False)

# op name -> callable, filled by the op modules with lazy loaders so that importing sapiens2
# never imports triton or the extension.
_IMPLS: dict[str, dict[str, Callable[[], Callable]]] = {"triton": {}, "cuda": {}}
_warned: set[tuple[str, str]] = set()


@contextlib.contextmanager
def use_backend(name: str, strict: bool = False) -> Iterator[None]:
    """Force the backend of every ``sapiens2`` op called inside the block."""
    global _state
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    old, _state = _state, (name, bool(strict))
    try:
        yield
    finally:
        _state = old


def current_backend() -> tuple[str, bool]:
    """The (name, strict) pair in force."""
    return _state


def remember(ctx) -> None:
    """In an ``autograd.Function.forward``: note the backend setting for its backward."""
    ctx.sapiens2_backend = _state


def as_in_forward(ctx):
    """In an ``autograd.Function.backward``: the backend setting that its forward ran under."""
    return use_backend(*getattr(ctx, "sapiens2_backend", _state))


def register_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` whose backward runs under the backend setting in force when
    the forward ran (``use_backend`` blocks often end before ``.backward()`` is called)."""

    def setup(ctx, inputs, output):
        remember(ctx)
        return setup_context(ctx, inputs, output)

    def bwd(ctx, *grads):
        with as_in_forward(ctx):
            return backward(ctx, *grads)

    torch.library.register_autograd(op, bwd, setup_context=setup)


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


def select(op: str, *tensors: torch.Tensor | None, unsupported: str | None = None) -> str | Callable:
    """Return ``"reference"`` or the implementation callable for ``op`` on these tensors.

    ``unsupported``: the op's reason why no kernel can take these inputs (e.g. a head dim below the
    kernels' tiles); ``auto`` then picks the reference, a forced backend falls back with a warning,
    and ``strict=True`` raises ``ValueError`` with that reason."""
    name, strict = _state
    on_gpu = any(t is not None and t.is_cuda for t in tensors)
    if unsupported is None and any(t is not None and t.dtype == torch.float64 for t in tensors):
        unsupported = "float64 inputs (the kernels compute in fp32/fp16/bf16)"
    if name == "reference":
        return "reference"
    if name == "auto":
        if unsupported is not None:
            return "reference"
        for backend in ("cuda", "triton"):
            if op in _IMPLS[backend] and on_gpu and _runnable(backend, on_gpu)[0]:
                return _IMPLS[backend][op]()
        return "reference"
    if op not in _IMPLS[name]:
        reason = f"op {op!r} has no {name} implementation"
    elif unsupported is not None:
        if strict:
            raise ValueError(f"use_backend({name!r}, strict=True): {op}: {unsupported}")
        reason = f"{op}: {unsupported}"
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
