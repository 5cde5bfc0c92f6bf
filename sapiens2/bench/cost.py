"""Memory-traffic cost model: every dispatched op is one kernel that reads its inputs from and writes
its outputs to HBM once.

Counting rules (pinned by ``tests/test_cost_model.py``):

* views and metadata ops (``func.is_view``, ``detach``, ``_unsafe_view``) and bare allocations
  (``empty*``) move nothing and launch nothing; every other op is one kernel, except the few
  composite ops that have no GPU kernel of their own (``slice_backward``, ``select_backward``): on a
  GPU they run their composite body (zero-fill + copy into the slice), so that body is run under
  the counter and each of its kernels counted;
* bytes read = the distinct elements of each distinct input storage the op sees (a broadcast,
  stride-0 view reads its storage once; several views of one storage add up, capped at the
  storage), bytes written = its outputs' elements; every element at its own dtype size — both
  sides run in pure bf16, so activations are 2 bytes and the fp32 statistics (rstd, lse) and our
  fp32 RoPE tables 4 bytes; an in-place op's destination is one write, plus one read unless the op
  only writes it (``copy_``, ``fill_``, ``zero_``);
* FLOPs from ``torch.utils.flop_counter``'s registry (matmuls, convolutions, attention; the
  ``sapiens2`` ops and the official-side flash stand-in register theirs); element-wise work
  counts zero FLOPs;
* "matmul" ops (mm/addmm/bmm/conv and the attention kernels) are reported apart, so traffic
  outside the matmuls can be compared;
* bytes kept for backward: storages saved by autograd during the forward (``saved_tensors_hooks``),
  each once, parameters excluded, at their real dtype size;
* the backward starts from output gradients made outside the counter (no ``ones_like`` seed) and
  returns gradients with ``torch.autograd.grad`` (no ``.grad`` accumulation copies);
* roofline time per op = max(FLOPs / 989.4 TFLOP/s, bytes / 3.35 TB/s) on an H100 SXM.

The official side is costed as PyTorch runs it on a GPU (``OfficialStyleBlock(gpu_like=True)``: one
fused RMSNorm kernel and one flash-attention kernel per direction) instead of the many aten ops
these decompose into on the CPU / meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .device import H100_SXM
from .sizing import saved_bytes, storage_key

aten = torch.ops.aten
# no kernel: allocations, and views the schema does not mark as aliasing (``_unsafe_view`` reshapes
# a matmul's output in place)
_NO_KERNEL = {aten.detach.default, aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
              aten._unsafe_view.default}


def _composite_key(op) -> torch._C.DispatchKey:
    """The dispatch key of ``op``'s composite (decomposing) kernel."""
    DK = torch._C.DispatchKey
    for key in (DK.CompositeExplicitAutograd, DK.CompositeExplicitAutogradNonFunctional):
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key):
            return key
    raise RuntimeError(f"{op} has no composite kernel")


# composite ops without a GPU kernel of their own whose body (zero-fill + copy) launches two kernels,
# with the dispatch key of that body
_GPU_COMPOSITE = {op: _composite_key(op) for op in (aten.slice_backward.default, aten.select_backward.default)}
# in-place ops that only write their destination
_WRITE_ONLY = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "linear",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention_for_cpu", "attention", "attention_backward", "flash_sdpa",
           "flash_sdpa_backward", "window_attention", "window_attention_backward", "cls_pool", "cls_pool_backward",
           "window_attention_qkv", "window_attention_qkv_backward", "cls_pool_kv", "cls_pool_kv_backward"}


def _footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: broadcast (stride-0) dimensions add none."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else min(size, 1)
    return n * t.element_size()


@dataclass
class OpCost:
    name: str
    phase: str  # "fwd" or "bwd" (run during the backward)
    read: int
    written: int
    flops: int
    matmul: bool

    @property
    def bytes(self) -> int:
        return self.read + self.written

    @property
    def roofline_s(self) -> float:
        return max(self.flops / H100_SXM.bf16_flops, self.bytes / H100_SXM.hbm_bytes_per_s)


# whose launch plans cost each custom-op namespace: ours on the Triton backend, the official side's
# stand-ins as PyTorch runs them
PLAN_BACKENDS = {"sapiens2": "triton", "sapiens2_cost": "torch"}


class CostCounter(TorchDispatchMode):
    """Records one ``OpCost`` per kernel launched: an ATen op is one kernel; a custom op with a launch
    plan (``sapiens2.ops.plan``) is each kernel of its plan."""

    def __init__(self, backends: dict | None = None):
        super().__init__()
        self.ops: list[OpCost] = []
        self.phase = "fwd"
        self.backends = dict(PLAN_BACKENDS, **(backends or {}))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GPU_COMPOSITE:  # run the composite body with this mode on, to see its kernels
            with self:
                return func._op_dk(_GPU_COMPOSITE[func], *args, **kwargs)
        out = func(*args, **kwargs)
        plan = self._plan(func)
        if plan is not None:
            for ln in plan(*args, **kwargs).launches:
                self.ops.append(OpCost(ln.kernel, self.phase, ln.bytes_read, ln.bytes_written, ln.flops, ln.matmul))
        elif func not in _NO_KERNEL and not func.is_view:
            self.ops.append(self._cost(func, args, kwargs, out))
        return out

    def _plan(self, func):
        from ..ops.plan import plan_for

        backend = self.backends.get(func.namespace)
        if backend is None:
            return None
        plan = plan_for(f"{func.namespace}::{func._schema.name.split('::', 1)[1]}", backend)
        if plan is None:
            raise NotImplementedError(f"{func} has no launch plan on the {backend} backend: the cost model would "
                                      "count it as one kernel, which is not what runs")
        return plan

    def _cost(self, func, args, kwargs, out) -> OpCost:
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        out_storages = {storage_key(t) for t in outs}
        written = sum(_footprint(t) for t in outs)
        views: dict[int, dict[tuple, int]] = {}  # storage -> distinct views of it -> their bytes
        caps: dict[int, int] = {}
        for t in ins:
            s = storage_key(t)
            if s in out_storages:  # an in-place / out= destination: accounted for below
                continue
            views.setdefault(s, {})[(t.storage_offset(), tuple(t.shape), tuple(t.stride()))] = _footprint(t)
            caps[s] = t.untyped_storage().nbytes()
        read = sum(min(sum(v.values()), caps[s]) for s, v in views.items())
        in_place = func._schema.is_mutable and "out" not in func._schema.overload_name  # not an out= variant
        if in_place and func not in _WRITE_ONLY:  # read-modify-write updates
            read += written
        packet = func._overloadpacket
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        return OpCost(f"{func.namespace}.{packet.__name__}", self.phase, read, written, flops,
                      packet.__name__ in _MATMUL)


@dataclass
class CostReport:
    label: str
    ops: list[OpCost] = field(repr=False)
    saved_bytes: int
    unit_bytes: int  # one N x C bf16 activation

    def total(self, attr: str, pred: Callable[[OpCost], bool] = lambda o: True):
        return sum(getattr(o, attr) for o in self.ops if pred(o))

    @property
    def bytes(self) -> int:
        return self.total("bytes")

    @property
    def bytes_outside_matmul(self) -> int:
        return self.total("bytes", lambda o: not o.matmul)

    @property
    def kernels(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> int:
        return self.total("flops")

    @property
    def roofline_s(self) -> float:
        return self.total("roofline_s")

    def summary(self) -> dict:
        d = {
            "label": self.label,
            "bytes": self.bytes,
            "bytes_outside_matmul": self.bytes_outside_matmul,
            "kernels": self.kernels,
            "kernels_fwd": sum(o.phase == "fwd" for o in self.ops),
            "flops": self.flops,
            "flops_matmul": self.total("flops", lambda o: o.matmul),
            "saved_bytes": self.saved_bytes,
            "roofline_s": self.roofline_s,
            "unit_bytes": self.unit_bytes,
        }
        for k in ("bytes", "bytes_outside_matmul", "saved_bytes"):
            d[k + "_units"] = d[k] / self.unit_bytes
        return d

    def per_op(self) -> list[dict]:
        rows: dict[tuple, dict] = {}
        for o in self.ops:
            r = rows.setdefault((o.phase, o.name), {"phase": o.phase, "op": o.name, "calls": 0, "bytes": 0, "flops": 0,
                                                     "roofline_s": 0.0})
            r["calls"] += 1
            r["bytes"] += o.bytes
            r["flops"] += o.flops
            r["roofline_s"] += o.roofline_s
        return list(rows.values())

    def to_dict(self) -> dict:
        return {**self.summary(), "ops": [asdict(o) for o in self.ops]}


def measure(label: str, fwd: Callable[[], tuple], params, unit_bytes: int, inputs=(), train: bool = True) -> CostReport:
    """Cost ``fwd()`` (returning output tensors) and, with ``train``, its backward from random output
    gradients; without ``train`` the forward runs under ``no_grad`` and keeps nothing.

    The backward returns the gradients of ``inputs`` and ``params`` (``torch.autograd.grad``) rather
    than accumulating into ``.grad``: accumulation copies are bookkeeping of the measurement, not
    work a model does."""
    params = list(params)
    counter = CostCounter()
    if not train:
        with torch.no_grad(), counter:
            fwd()
        return CostReport(label, counter.ops, 0, unit_bytes)
    holder = {}

    def run():
        holder["outs"] = fwd()
        return holder["outs"]

    with counter:
        saved = saved_bytes(run, params)
    outs = [o for o in holder["outs"] if o is not None and o.requires_grad]
    grads = [torch.empty_like(o) for o in outs]  # made outside the counter: the seed is no kernel
    counter.phase = "bwd"
    with counter:
        torch.autograd.grad(outs, [*inputs, *params], grads, allow_unused=True)
    return CostReport(label, counter.ops, saved, unit_bytes)


def compare(ours: CostReport, official: CostReport) -> dict:
    """Ratios ours / official of the totals (those with a nonzero official figure)."""
    a, b = ours.summary(), official.summary()
    return {k: a[k] / b[k] for k in ("bytes", "bytes_outside_matmul", "kernels", "saved_bytes", "roofline_s", "flops",
                                     "flops_matmul") if b[k]}


# ---------------------------------------------------------------------------------------- blocks and stages


def cost_block(arch, img=(1024, 768), batch: int = 1, gqa: bool = False, side: str = "ours",
               train: bool = True) -> CostReport:
    """One trunk block (full attention, or GQA) of ``arch`` at ``img``, in bf16 on the meta device.

    ``side="ours"``: ``Block`` in steady state, ``(h, pending) -> (h', pending')``; the backward gets
    gradients for both outputs. ``side="official"``: ``OfficialStyleBlock(gpu_like=True)`` built from
    it, ``x -> x'``. Both with bf16 RoPE tables (both models' default; our kernels read them as they
    are and rotate in fp32). ``N = 1 + 8 + (H/16)(W/16)``."""
    from ..models.config import get_arch
    from ..models.layers import Block
    from .official_block import OfficialStyleBlock

    if side not in ("ours", "official"):
        raise ValueError(f"side must be 'ours' or 'official', got {side!r}")
    cfg = get_arch(arch)
    C, H, D = cfg.embed_dims, cfg.num_heads, cfg.head_dim
    Hkv = H // cfg.gqa_kv_ratio if gqa else H
    P = 1 + cfg.n_storage_tokens
    N = P + (img[0] // 16) * (img[1] // 16)
    bf16, meta = torch.bfloat16, torch.device("meta")
    with meta:
        block = Block(C, H, Hkv, cfg.ffn_hidden).to(bf16)
    act = lambda: torch.empty(batch, N, C, device=meta, dtype=bf16, requires_grad=train)  # noqa: E731
    unit = batch * N * C * 2
    label = f"{side} {'GQA' if gqa else 'MHA'}"
    if side == "ours":
        h, pending = act(), act()
        sin, cos = torch.empty(2, N - P, D, device=meta, dtype=bf16)
        return measure(label, lambda: block(h, pending, (sin, cos), P), block.parameters(), unit, (h, pending), train)
    official = OfficialStyleBlock.from_ours(block, gpu_like=True)
    x = act()
    sin, cos = torch.empty(2, N - P, D, device=meta, dtype=bf16)
    return measure(label, lambda: (official(x, sin, cos),), official.parameters(), unit, (x,), train)


def block_costs(arch, img_size=(1024, 768), batch: int = 1, gqa: bool = False,
                train: bool = True) -> tuple[CostReport, CostReport]:
    """(ours, official) for one trunk block (full attention, or GQA) at ``img_size``."""
    return tuple(cost_block(arch, img_size, batch, gqa, side, train) for side in ("ours", "official"))


def tokenizer_costs(arch="sapiens2_1b", img_size=(4096, 3072), batch: int = 1, mask_ratio: float = 0.0,
                    official: bool = False) -> CostReport:
    """The 4K tokenizer stage (from patch tokens to one token per window), training step."""
    from ..models.config import get_arch
    from ..models.tokenizer import WindowTokenizer
    from .official_block import OfficialStyleTokenizer

    cfg = get_arch(arch)
    C, w = cfg.embed_dims, cfg.window_size
    gh, gw = img_size[0] // 16, img_size[1] // 16
    nW = (gh // w) * (gw // w)
    K = nW - int(round(mask_ratio * nW))
    bf16, meta = torch.bfloat16, torch.device("meta")
    with meta:
        mod = (OfficialStyleTokenizer(C, cfg.num_heads, cfg.num_tokenizer_layers, w) if official else
               WindowTokenizer(C, cfg.num_heads, cfg.num_tokenizer_layers, w)).to(bf16).train()
    if official:
        if mask_ratio:
            raise ValueError("the official tokenizer has no masked form")
        x = torch.empty(batch, gh * gw, C, device=meta, dtype=bf16, requires_grad=True)
        fwd = lambda: (mod(x, (gh, gw)),)  # noqa: E731
    else:
        layout = "windows" if mask_ratio else "grid"
        x = torch.empty(batch, K * w * w, C, device=meta, dtype=bf16, requires_grad=True)
        fwd = lambda: (mod(x, (gh, gw), layout=layout),)  # noqa: E731
    label = f"{'official' if official else 'ours'} tokenizer" + (f", {mask_ratio:.0%} masked" if mask_ratio else "")
    return measure(label, fwd, mod.parameters(), batch * nW * C * 2, (x,))


def forward_stage_share(arch="sapiens2_1b", img_size=(4096, 3072), batch: int = 1) -> dict:
    """Predicted H100 roofline time of one inference forward of the 4K model, and the tokenizer's share."""
    from ..models.backbone import Sapiens2Backbone

    model = Sapiens2Backbone(arch, img_size=img_size, use_tokenizer=True, device="meta", dtype=torch.bfloat16).eval()
    x = torch.empty(batch, 3, *img_size, device="meta", dtype=torch.bfloat16)
    whole, tok = CostCounter(), CostCounter()
    with torch.no_grad():
        with whole:
            model(x)
        patches = torch.empty(batch, (img_size[0] // 16) * (img_size[1] // 16), model.embed_dims, device="meta",
                              dtype=torch.bfloat16)
        with tok:
            model.tokenizer(patches, (img_size[0] // 16, img_size[1] // 16))
    t_all = sum(o.roofline_s for o in whole.ops)
    t_tok = sum(o.roofline_s for o in tok.ops)
    return {"forward_roofline_s": t_all, "tokenizer_roofline_s": t_tok, "tokenizer_share": t_tok / t_all,
            "forward_flops": sum(o.flops for o in whole.ops), "tokenizer_flops": sum(o.flops for o in tok.ops)}
