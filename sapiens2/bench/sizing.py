"""Sizing a training run: estimated step time and per-GPU memory for FSDP2, with and without
activation checkpointing. One module, shared with the trainer's ``--dry-run``.

Memory model (bytes per GPU, FSDP2 full sharding, bf16 compute with fp32 master weights):

* sharded state: fp32 params + fp32 grads + AdamW moments = 16 bytes per parameter / GPUs;
* gathered bf16 parameters of two blocks in flight (current + prefetched);
* activations kept for backward, measured by running the model on the meta device in bf16
  under ``saved_tensors_hooks`` (each storage once, parameters excluded): per micro-batch x views.
  With checkpointing per block only each block's input is kept, plus one block's activations
  during its recomputation.

Time model: model FLOPs of the step (``sapiens2.flops``; with checkpointing one extra forward of
the blocks is hardware work) / (GPUs x peak x assumed MFU). Replace the assumed MFU by the one
measured with ``sapiens2 bench model --train`` on the target GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..flops import count_flops
from ..models.backbone import Sapiens2Backbone
from ..models.config import get_arch
from .device import H100_SXM, DevicePeak


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (``_cdata``: the StorageImpl; meta tensors have no data_ptr)."""
    return t.untyped_storage()._cdata


def saved_bytes(fn, params, checkpointed: tuple = ()) -> int:
    """Bytes kept for backward while ``fn()`` runs: each saved storage once, parameters (and views
    of them, e.g. a transposed weight) excluded.

    ``checkpointed``: modules under non-reentrant activation checkpointing; the inputs each holds
    until its recompute are counted too (recent PyTorch saves them through the saved-tensor hooks,
    older releases keep them in the checkpoint frame out of the hooks' sight; storages count once
    either way). Inside a checkpointed region the checkpoint's own hooks replace these, so what the
    recompute keeps is not counted here."""
    param_storages = {storage_key(p) for p in params}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        key = storage_key(t)
        if key not in param_storages:
            seen.setdefault(key, t.untyped_storage().nbytes())

    def pack(t: torch.Tensor):
        keep(t)
        return t

    def pre_hook(_module, args, kwargs):
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (tuple, list)) else (a,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    keep(t)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


@dataclass
class Sizing:
    arch: str
    img_size: tuple[int, int]
    use_tokenizer: bool
    mask_ratio: float
    gpus: int
    global_batch: int
    micro_batch: int
    views: int
    grad_accum: int
    checkpointing: bool
    assumed_mfu: float
    step_flops: int  # model FLOPs of one optimizer step, all GPUs
    step_seconds: float
    run_hours: float
    mem_state_gb: float
    mem_gathered_gb: float
    mem_activations_gb: float
    mem_total_gb: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d


def activation_bytes_per_view(arch, img_size, use_tokenizer: bool, mask_ratio: float) -> tuple[int, int]:
    """(bytes kept for backward by one view, bytes of one block's input) in bf16, measured on meta."""
    cfg = get_arch(arch)
    model = Sapiens2Backbone(cfg, img_size=img_size, use_tokenizer=use_tokenizer, device="meta", dtype=torch.bfloat16)
    model.train()
    x = torch.empty(1, 3, *img_size, device="meta", dtype=torch.bfloat16)
    ids = None
    rep = count_flops(cfg, img_size, use_tokenizer=use_tokenizer, mask_ratio=mask_ratio)
    if mask_ratio:
        ids = torch.arange(rep.trunk_tokens - 9, device="meta")[None]
    act = saved_bytes(lambda: model(x, ids), model.parameters())
    return act, rep.trunk_tokens * cfg.embed_dims * 2


def size_run(arch, img_size=(1024, 768), use_tokenizer=False, mask_ratio=0.0, gpus=8, global_batch=256,
             micro_batch=4, views=1, steps=1000, checkpointing=False, assumed_mfu=0.4,
             peak: DevicePeak = H100_SXM, activation: Optional[tuple[int, int]] = None) -> Sizing:
    cfg = get_arch(arch)
    if global_batch % (gpus * micro_batch):
        raise ValueError(f"global_batch={global_batch} must be a multiple of gpus x micro_batch = {gpus * micro_batch}")
    grad_accum = global_batch // (gpus * micro_batch)
    rep = count_flops(cfg, img_size, use_tokenizer=use_tokenizer, mask_ratio=mask_ratio)
    step_flops = rep.flops_train_step * global_batch * views
    hw_flops = step_flops + (rep.flops_forward * global_batch * views if checkpointing else 0)
    step_s = hw_flops / (gpus * peak.bf16_flops * assumed_mfu)
    act, block_in = activation or activation_bytes_per_view(cfg, img_size, use_tokenizer, mask_ratio)
    per_layer = act / cfg.num_layers
    if checkpointing:
        act_micro = micro_batch * views * (cfg.num_layers * block_in + per_layer)
    else:
        act_micro = micro_batch * views * act
    biggest_block = max(
        sum(p.numel() for p in blk.parameters())
        for blk in Sapiens2Backbone(cfg, use_tokenizer=use_tokenizer, device="meta").blocks
    )
    state = 16 * rep.params / gpus
    gathered = 2 * 2 * biggest_block
    gb = 1024**3
    return Sizing(
        arch=cfg.name, img_size=tuple(img_size), use_tokenizer=use_tokenizer, mask_ratio=mask_ratio, gpus=gpus,
        global_batch=global_batch, micro_batch=micro_batch, views=views, grad_accum=grad_accum,
        checkpointing=checkpointing, assumed_mfu=assumed_mfu, step_flops=step_flops, step_seconds=step_s,
        run_hours=step_s * steps / 3600, mem_state_gb=state / gb, mem_gathered_gb=gathered / gb,
        mem_activations_gb=act_micro / gb, mem_total_gb=(state + gathered + act_micro) / gb,
    )
