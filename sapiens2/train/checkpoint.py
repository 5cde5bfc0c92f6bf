"""Crash-safe sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``step_XXXXXXXX`` (the number of optimizer steps completed). It is
written under ``step_XXXXXXXX.tmp`` by every rank and renamed by rank 0 only after all ranks
finished, so a crash mid-write leaves a ``.tmp`` directory that is ignored and removed, never a
half checkpoint that looks complete. DCP stores each rank's shards and a metadata file; loading
re-shards, so a run can resume on another number of ranks. (DCP's metadata file is a pickle, as
DCP writes it: load checkpoints your own runs wrote; share weights as the exported safetensors.)

Retention: the newest ``keep_last`` are kept, plus every step that is a multiple of ``keep_every``.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def complete_steps(root: str) -> list[int]:
    """Steps with a finished checkpoint under ``root`` (renamed and with DCP's metadata), ascending."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, ".metadata")):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_step(root: str) -> Optional[int]:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(root: str, step: int, state: dict, keep_last: int = 3, keep_every: int = 0) -> str:
    """Write ``state`` (a DCP state dict: sharded tensors, plain tensors) as checkpoint ``step``."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if _is_main():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if _is_main():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _apply_retention(root, keep_last, keep_every)
    _barrier()
    return final


def load(root: str, step: int, state: dict) -> None:
    """Load checkpoint ``step`` into ``state`` in place (re-sharding to this run's layout)."""
    path = step_dir(root, step)
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    dcp.load(state, checkpoint_id=path)


def _apply_retention(root: str, keep_last: int, keep_every: int) -> None:
    steps = complete_steps(root)
    keep = set(steps[-max(keep_last, 1):])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep:
            shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of crashed writes
        if name.endswith(".tmp") and _STEP_DIR.match(name[:-4]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
