"""Memory-traffic cost model: every dispatched op is one kernel that reads its inputs from and writes
its outputs to HBM once.

Counting rules (pinned by ``tests/test_cost_model.py``):

* views and metadata ops (``func.is_view``, ``detach``) and bare allocations (``empty*``) move
  nothing and launch nothing; every other op is one kernel;
* bytes read = every distinct input storage's elements that the op sees, bytes written = its
  outputs' elements; floating elements count at the bf16 size (2 bytes), others at their size;
  an in-place op's output aliasing an input is one write, not an extra read;
* FLOPs from ``torch.utils.flop_counter``'s registry (matmuls, convolutions, attention; the
  ``sapiens2`` ops register theirs); element-wise work counts zero FLOPs;
* "matmul" ops (mm/addmm/bmm/conv and the attention kernels) are reported apart, so traffic
  outside the matmuls can be compared;
* bytes kept for backward: storages saved by autograd during the forward (``saved_tensors_hooks``),
  each once, parameters excluded, at their real dtype size in a bf16 run;
* roofline time per op = max(FLOPs / 989.4 TFLOP/s, bytes / 3.35 TB/s) on an H100 SXM.

Both sides run in pure bf16 on the meta device. The official side is costed as PyTorch runs it on
a GPU (``OfficialStyleBlock(gpu_like=True)``: fused RMSNorm kernels, one flash kernel for SDPA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .device import H100_SXM
from .sizing import saved_bytes

aten = torch.ops.aten
# no kernel: allocations, and views the schema does not mark as aliasing (``_unsafe_view`` reshapes
# a matmul's output in place)
_NO_KERNEL = {aten.detach.default, aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
              aten._unsafe_view.default}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "linear",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention_for_cpu", "attention", "attention_backward", "flash_sdpa",
           "flash_sdpa_backward", "window_attention", "window_attention_backward", "cls_pool", "cls_pool_backward"}


def _elem_bytes(t: torch.Tensor) -> int:
    return 2 if t.is_floating_point() else t.element_size()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class OpCost:
    name: str
    phase: str  # "fwd" or "bwd"
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


class CostCounter(TorchDispatchMode):
    """Records one ``OpCost`` per kernel-launching dispatched op."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpCost] = []
        self.phase = "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _NO_KERNEL or func.is_view:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_storages = {}
        for t in ins:
            in_storages.setdefault(_storage(t), t.numel() * _elem_bytes(t))
        written = 0
        for t in outs:
            s = _storage(t)
            written += t.numel() * _elem_bytes(t)
            in_storages.pop(s, None)  # in-place: the aliased input is read as part of the update
        read = sum(in_storages.values())
        if func._schema.is_mutable and func is not aten.copy_.default:  # read-modify-write updates
            read += written
        packet = func._overloadpacket
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        self.ops.append(OpCost(f"{func.namespace}.{packet.__name__}", self.phase, read, written, flops,
                               packet.__name__ in _MATMUL))
        return out


@dataclass
class CostReport:
    label: str
    ops: list[OpCost] = field(repr=False)
    saved_bytes: int
    unit_bytes: int  # one N x C bf16 activation

    def total(self, attr: str, pred: Callable[[OpCost], bool] = lambda o: True):
        return sum(getattr(o, attr) for o in self.ops if pred(o))

    def summary(self) -> dict:
        outside = lambda o: not o.matmul  # noqa: E731
        d = {
            "label": self.label,
            "bytes": self.total("bytes"),
            "bytes_outside_matmul": self.total("bytes", outside),
            "kernels": len(self.ops),
            "kernels_fwd": sum(o.phase == "fwd" for o in self.ops),
            "flops": self.total("flops"),
            "saved_bytes": self.saved_bytes,
            "roofline_s": self.total("roofline_s"),
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


def measure(label: str, fwd: Callable[[], tuple], params, unit_bytes: int, inputs=()) -> CostReport:
    """Cost ``fwd()`` (returning output tensors) and its backward from random output gradients.

    The backward returns the gradients of ``inputs`` and ``params`` (``torch.autograd.grad``) rather
    than accumulating into ``.grad``: accumulation copies are bookkeeping of the measurement, not
    work a model does."""
    params = list(params)
    counter = CostCounter()
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
    a, b = ours.summary(), official.summary()
    return {k: a[k] / b[k] for k in ("bytes", "bytes_outside_matmul", "kernels", "saved_bytes", "roofline_s", "flops")
            if b[k]}


# ---------------------------------------------------------------------------------------- blocks and stages


def block_costs(arch, img_size=(1024, 768), batch: int = 1, gqa: bool = False) -> tuple[CostReport, CostReport]:
    """(ours, official) for one trunk block (full attention, or GQA) at ``img_size``, training step."""
    from ..models.config import get_arch
    from ..models.layers import Block
    from .official_block import OfficialStyleBlock

    cfg = get_arch(arch)
    C, H, D = cfg.embed_dims, cfg.num_heads, cfg.head_dim
    Hkv = H // cfg.gqa_kv_ratio if gqa else H
    N = 1 + cfg.n_storage_tokens + (img_size[0] // 16) * (img_size[1] // 16)
    P = 1 + cfg.n_storage_tokens
    bf16, meta = torch.bfloat16, torch.device("meta")
    with meta:
        ours = Block(C, H, Hkv, cfg.ffn_hidden).to(bf16)
        official = OfficialStyleBlock(C, H, Hkv, cfg.ffn_hidden, gpu_like=True).to(bf16)
    act = lambda: torch.empty(batch, N, C, device=meta, dtype=bf16, requires_grad=True)  # noqa: E731
    sin32 = torch.empty(N - P, D, device=meta)  # our kernels rotate in fp32
    sin16 = torch.empty(N - P, D, device=meta, dtype=bf16)  # the official default: bf16 tables
    h, pending, x = act(), act(), act()
    unit = batch * N * C * 2
    kind = "GQA" if gqa else "MHA"
    r_ours = measure(f"ours {kind}", lambda: ours(h, pending, (sin32, sin32), P), ours.parameters(), unit, (h, pending))
    r_off = measure(f"official {kind}", lambda: (official(x, sin16, sin16),), official.parameters(), unit, (x,))
    return r_ours, r_off


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
