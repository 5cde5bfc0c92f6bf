"""Record the kernels a piece of code really launches, with the bytes each really touches.

``LaunchRecorder`` (a context manager) sees

* every Triton launch made under the interpreter (``TRITON_INTERPRET=1``, CPU tensors), with the
  distinct bytes each kernel loads and stores per tensor argument (every active lane of every load,
  store and atomic, by address) and the FLOPs of its ``tl.dot`` calls (``2 M N K`` per call, tails
  included);
* every kernel of the hand-written CUDA ops run under the CPU emulation (``torch.ops.sapiens2_emu``,
  ``sapiens2.ops.cuda.emulated()``), from the emulator's launch log: each launch's kernel and the
  distinct bytes it reads and writes, by address, in the op's inputs, its outputs and the scratch
  its binding allocates (the emulator does not see FLOPs: ``flops`` is None for these);
* every ATen kernel dispatched while it is active (a ``TorchDispatchMode``), costed by the cost
  model's rules (``cost.CostCounter``): views and allocations launch nothing.

It is the ground truth the launch plans (``plan.py``) are tested against. Tensors are identified by
storage; ``labels`` names them (inputs by name, outputs ``out<i>``, the rest ``scratch<k>`` in order
of first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cost import _GPU_COMPOSITE, _NO_KERNEL, CostCounter
from .sizing import storage_key


@dataclass
class Recorded:
    kernel: str
    reads: dict = field(default_factory=dict)  # storage key -> distinct bytes
    writes: dict = field(default_factory=dict)
    flops: int | None = 0


class _TritonTap:
    """Interpreter hooks: launch boundaries, memory accesses and dots."""

    def __init__(self, rec: "LaunchRecorder"):
        self.rec = rec
        self.current = None  # (name, [(lo, hi, key)], {key: [addr arrays]}, {key: [addr arrays]}, flops)

    def install(self):
        from triton.runtime import interpreter as I

        self.I, B, G = I, I.InterpreterBuilder, I.GridExecutor
        self.saved = {n: getattr(B, n) for n in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                                 "create_atomic_cas", "create_dot")}
        self.saved_call = G.__call__
        tap = self

        def call(grid_self, *args, **kwargs):
            ranges = {}  # one entry per storage, however many arguments view it
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    s = a.untyped_storage()
                    ranges[storage_key(a)] = (s.data_ptr(), s.data_ptr() + s.nbytes(), storage_key(a), a.element_size())
            ranges = list(ranges.values())
            fn = grid_self.fn
            name = f"triton:{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
            outer, tap.current = tap.current, {"name": name, "ranges": ranges,
                                                "r": [], "w": [], "flops": 0}
            try:
                # the interpreter's own tensor handling (argument copies) is not the kernel's work
                with torch.utils._python_dispatch._disable_current_modes():
                    return tap.saved_call(grid_self, *args, **kwargs)
            finally:
                tap.rec._add(tap._finish(tap.current))
                tap.current = outer

        def access(kind):
            def hook(ptrs, mask, esize):
                if tap.current is not None:
                    addrs = np.asarray(ptrs.data).reshape(-1)
                    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).reshape(-1)
                    tap.current[kind].append((addrs[m].astype(np.uint64), esize))
            return hook

        rd, wr = access("r"), access("w")

        def esize(ptrs):
            return ptrs.get_element_ty().primitive_bitwidth // 8

        def masked_load(b, ptrs, mask, other, *a):
            rd(ptrs, mask, esize(ptrs))
            return tap.saved["create_masked_load"](b, ptrs, mask, other, *a)

        def masked_store(b, ptrs, value, mask, *a):
            wr(ptrs, mask, esize(ptrs))
            return tap.saved["create_masked_store"](b, ptrs, value, mask, *a)

        def atomic_rmw(b, op, ptr, val, mask, *a):
            rd(ptr, mask, esize(ptr))
            wr(ptr, mask, esize(ptr))
            return tap.saved["create_atomic_rmw"](b, op, ptr, val, mask, *a)

        def atomic_cas(b, ptr, cmp, val, *a):
            ones = type("M", (), {"data": np.ones(np.asarray(ptr.data).shape, dtype=bool)})()
            rd(ptr, ones, esize(ptr))
            wr(ptr, ones, esize(ptr))
            return tap.saved["create_atomic_cas"](b, ptr, cmp, val, *a)

        def dot(b, a_, b_, d, *rest):
            if tap.current is not None:
                M, K = a_.data.shape[-2:]
                N = b_.data.shape[-1]
                lead = int(np.prod(a_.data.shape[:-2])) if a_.data.ndim > 2 else 1
                tap.current["flops"] += 2 * M * N * K * lead
            return tap.saved["create_dot"](b, a_, b_, d, *rest)

        B.create_masked_load, B.create_masked_store = masked_load, masked_store
        B.create_atomic_rmw, B.create_atomic_cas, B.create_dot = atomic_rmw, atomic_cas, dot
        G.__call__ = call

    def uninstall(self):
        for n, f in self.saved.items():
            setattr(self.I.InterpreterBuilder, n, f)
        self.I.GridExecutor.__call__ = self.saved_call

    @staticmethod
    def _finish(cur) -> Recorded:
        """Distinct bytes per storage, listed in the kernel's argument order."""
        r = Recorded(cur["name"], flops=int(cur["flops"]))
        for kind, out in (("r", r.reads), ("w", r.writes)):
            if not cur[kind]:
                continue
            by_size: dict[int, np.ndarray] = {}
            for addrs, es in cur[kind]:
                by_size.setdefault(es, []).append(addrs)
            by_size = {es: np.unique(np.concatenate(parts)) for es, parts in by_size.items()}
            for lo, hi, key, _ in cur["ranges"]:
                n = sum(int(np.count_nonzero((a >= lo) & (a < hi))) * es for es, a in by_size.items())
                if n:
                    out[key] = n
        return r


class LaunchRecorder(TorchDispatchMode):
    """``with LaunchRecorder() as rec: fn()``; then ``rec.launches`` (``Recorded``), in launch order."""

    def __init__(self):
        super().__init__()
        self.launches: list[Recorded] = []
        self._counter = CostCounter()
        self._tap = _TritonTap(self)

    def _add(self, r: Recorded) -> None:
        self.launches.append(r)

    def __enter__(self):
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:  # re-entered to look inside our ops: the hooks are in place already
            self._tap.install()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._tap.uninstall()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sapiens2":  # look inside our ops: run their implementation under this mode
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if func.namespace == "sapiens2_emu":
            return self._emulated(func, args, kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
            # an alias-or-copy op (``to``, ``contiguous``, ...) reaching the mode: record what it runs
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in _GPU_COMPOSITE:
            with self:
                return func._op_dk(_GPU_COMPOSITE[func], *args, **kwargs)
        out = func(*args, **kwargs)
        if func not in _NO_KERNEL and not func.is_view:
            cost = self._counter._cost(func, args, kwargs, out)
            ins = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            r = Recorded(cost.name, flops=cost.flops)
            out_keys = {storage_key(t) for t in outs}
            for t in ins:
                if storage_key(t) not in out_keys:
                    r.reads[storage_key(t)] = None  # ATen kernels: bytes by the cost model's rule, per launch
            for t in outs:
                r.writes[storage_key(t)] = None
            r.aten_bytes = (cost.read, cost.written)
            self._add(r)
        return out

    def _emulated(self, func, args, kwargs):
        """One emulated CUDA op: its launches from the emulator's log, each byte range attributed to
        the storage of an input or output it lies in; bytes in none of them are the binding's scratch
        (freed by now), one key per buffer: ranges that overlap a range seen before in this op share
        its key."""
        from ..cuda_tools.emu_ext import launch_log

        with launch_log() as logged:
            out = func(*args, **kwargs)
        known = {}
        for t in torch.utils._pytree.tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                known[storage_key(t)] = (s.data_ptr(), s.data_ptr() + s.nbytes())
        scratch: list[list] = []  # [lo, hi, key]

        def attribute(ranges, dest):
            for lo, hi in ranges:
                left = [(lo, hi)]
                for key, (a, b) in known.items():
                    n = max(0, min(hi, b) - max(lo, a))
                    if n:
                        dest[key] = dest.get(key, 0) + n
                        left = [piece for (x, y) in left for piece in ((x, min(y, a)), (max(x, b), y)) if piece[0] < piece[1]]
                for x, y in left:
                    for s_ in scratch:
                        if x < s_[1] and y > s_[0]:
                            s_[0], s_[1] = min(s_[0], x), max(s_[1], y)
                            break
                    else:
                        self._scratch_ids = getattr(self, "_scratch_ids", 0) + 1
                        s_ = [x, y, ("emulated-scratch", self._scratch_ids)]
                        scratch.append(s_)
                    dest[s_[2]] = dest.get(s_[2], 0) + (y - x)

        for ln in logged:
            r = Recorded(f"cuda:{ln.kernel}", flops=None)
            attribute(ln.reads, r.reads)
            attribute(ln.writes, r.writes)
            self._add(r)
        return out


def label_storages(launches: list[Recorded], named: dict[str, torch.Tensor]) -> dict:
    """storage key -> label: ``named`` tensors by their names, the rest ``scratch<k>`` in order of first use."""
    labels = {storage_key(t): name for name, t in named.items() if isinstance(t, torch.Tensor)}
    k = 0
    for r in launches:
        for key in list(r.reads) + list(r.writes):
            if key not in labels:
                labels[key] = f"scratch{k}"
                k += 1
    return labels
