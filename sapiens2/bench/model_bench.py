"""``sapiens2 bench model``: params, FLOPs per image, images/s, TFLOP/s, MFU and peak memory of a
whole backbone, forward or training step, with nvtx ranges per block and phase for Nsight."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..flops import count_flops
from ..models.backbone import Sapiens2Backbone
from .device import current_device_peak, mfu
from .timing import time_fn


@dataclass
class ModelBenchResult:
    arch: str
    img_size: tuple[int, int]
    batch: int
    train: bool
    use_tokenizer: bool
    device: str
    dtype: str
    params: int
    flops_per_image: int  # model FLOPs (forward, or forward + backward): MFU's numerator
    hw_flops_per_image: int  # executed FLOPs (the 4K tokenizer is recomputed in backward)
    seconds_per_iter: float
    images_per_s: float
    tflops_per_s: float
    mfu: Optional[float]  # None off a known GPU
    peak_memory_bytes: Optional[int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d


def add_nvtx_ranges(model: torch.nn.Module) -> list:
    """Push/pop an nvtx range around every block (and the tokenizer) so Nsight Systems shows them."""
    import nvtx

    handles = []
    named = [(f"block {i}", b) for i, b in enumerate(getattr(model, "blocks", []))]
    if getattr(model, "tokenizer", None) is not None:
        named.append(("tokenizer", model.tokenizer))
    for name, mod in named:
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: nvtx.push_range(n)))
        handles.append(mod.register_forward_hook(lambda m, a, o: nvtx.pop_range()))
    return handles


def bench_model(arch: str, img_size=(1024, 768), batch: int = 1, train: bool = False, use_tokenizer: bool = False,
                device: Optional[str] = None, dtype: torch.dtype = torch.bfloat16, repeats: int = 10) -> ModelBenchResult:
    import nvtx

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU bf16 matmuls are emulated and would misrepresent the model
    model = Sapiens2Backbone(arch, img_size=img_size, use_tokenizer=use_tokenizer, device=device, dtype=dtype)
    model.train(train)
    add_nvtx_ranges(model)
    x = torch.randn(batch, 3, *img_size, device=device, dtype=dtype)

    def step():
        with nvtx.annotate("forward"):
            ctx = contextlib.nullcontext() if train else torch.no_grad()
            with ctx:
                out = model(x)
        if train:
            with nvtx.annotate("backward"):
                out.backward(torch.ones_like(out))
            model.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = time_fn(step, warmup=2, repeats=repeats, cuda=device == "cuda")
    rep = count_flops(model.arch, img_size, batch=1, use_tokenizer=use_tokenizer)
    flops = rep.flops_train_step if train else rep.flops_forward
    hw_flops = rep.hw_flops_train_step if train else rep.flops_forward
    peak = current_device_peak() if device == "cuda" else None
    return ModelBenchResult(
        arch=model.arch.name, img_size=tuple(img_size), batch=batch, train=train, use_tokenizer=use_tokenizer,
        device=timing.device, dtype=str(dtype).replace("torch.", ""), params=rep.params, flops_per_image=flops,
        hw_flops_per_image=hw_flops,
        seconds_per_iter=timing.median_s, images_per_s=batch / timing.median_s,
        tflops_per_s=flops * batch / timing.median_s / 1e12,
        mfu=mfu(flops * batch, timing.median_s, peak) if peak else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
    )
