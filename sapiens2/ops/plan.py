"""Launch plans: what each custom op launches on a GPU, kernel by kernel.

A plan is a function of an op's arguments (shapes, dtypes and flags only: it runs on meta tensors)
returning the ordered list of ``Launch``es the op's implementation performs on a backend: every
Triton kernel and every ATen kernel (casts, zero-fills, partial-sum reductions, contiguity copies),
each with the distinct bytes it reads and writes per tensor and the FLOPs it executes (matmuls at
their tile sizes: masked tail tiles are computed in full). ``sapiens2 bench cost`` expands each op
into its plan; ``tests/test_launch_plans.py`` runs every op on the Triton interpreter (and the CUDA
emulator), records the launches it really makes and the bytes each really touches, and checks the
plan against them.

Tensors are named by label: the op's argument names (``q``, ``weight``, ...), ``out0``, ``out1``, ...
for its outputs, and ``scratch:<name>`` for buffers it allocates and drops. Counting rules (both
sides of every comparison alike): bytes are distinct bytes per kernel (an element re-read inside one
kernel counts once, as an L2-resident re-read), an atomic read-modify-write counts as one read and
one write of each element it touches, elements at their dtype's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Launch:
    kernel: str  # "triton:<jit function>", "aten.<op>", or "<library>:<kernel>" for baselines
    reads: tuple[tuple[str, int], ...] = ()  # (tensor label, distinct bytes read)
    writes: tuple[tuple[str, int], ...] = ()
    flops: int = 0  # executed, at tile granularity
    matmul: bool = False  # a GEMM / attention kernel (reported apart from the memory-bound rest)

    @property
    def bytes_read(self) -> int:
        return sum(b for _, b in self.reads)

    @property
    def bytes_written(self) -> int:
        return sum(b for _, b in self.writes)


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    scratch: dict[str, int] = field(default_factory=dict)  # label -> bytes allocated (freed by the op)

    def add(self, kernel: str, reads=(), writes=(), flops: int = 0, matmul: bool = False) -> None:
        self.launches.append(Launch(kernel, tuple((k, int(b)) for k, b in reads if b),
                                    tuple((k, int(b)) for k, b in writes if b), int(flops), matmul))

    def alloc(self, label: str, nbytes: int) -> str:
        self.scratch[label] = int(nbytes)
        return label


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


def elems(*shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# op name ("sapiens2::attention_backward") -> backend -> plan(*op args) -> Plan
_PLANS: dict[str, dict[str, Callable[..., Plan]]] = {}


def register_plan(op: str, backend: str):
    """Decorator: ``fn(*op_args) -> Plan`` is ``op``'s launch plan on ``backend``."""

    def deco(fn):
        _PLANS.setdefault(op, {})[backend] = fn
        return fn
    return deco


def plan_for(op: str, backend: str) -> Callable[..., Plan] | None:
    _load()
    return _PLANS.get(op, {}).get(backend)


def planned_ops(backend: str) -> list[str]:
    _load()
    return sorted(op for op, by in _PLANS.items() if backend in by)


def _load() -> None:
    # the plan modules register themselves on import (the baselines' live with the cost model)
    from ..bench import plans_official  # noqa: F401
    from . import launch_plans, launch_plans_cuda  # noqa: F401
