"""Timing that is honest about where it ran: CUDA events / ``triton.testing.do_bench`` with warm-up
on a GPU (median and spread), wall clock on a CPU (marked as such)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class Timing:
    device: str  # "cuda: <name>" or "cpu"
    median_s: float
    p20_s: float
    p80_s: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], warmup: int = 3, repeats: int = 10, cuda: bool | None = None) -> Timing:
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        med, p20, p80 = (x / 1e3 for x in q)
        return Timing(f"cuda: {torch.cuda.get_device_name(0)}", med, p20, p80, repeats=-1)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else samples * 4
    return Timing("cpu", statistics.median(samples), q[0], q[3], repeats)
