"""Process group and device mesh: the same code path for one process and for torchrun.

Without torchrun's environment a one-rank group is created in-process (a TCP store on a free local
port), so a plain ``sapiens2 pretrain`` and ``torchrun --nproc_per_node K`` run the same FSDP2 code:
the one-process run is the K = 1 case. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_group: bool  # this process created the group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's group (``RANK``/``WORLD_SIZE`` set) or make a one-rank group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), device=dev,
                    owns_group=owns)


def make_mesh(info: DistInfo, hsdp: bool = False, shard_size: int = 0) -> DeviceMesh:
    """1-D mesh (FSDP over every rank), or 2-D ``(replicate, shard)`` for HSDP: shard within groups of
    ``shard_size`` ranks (default: one node's), replicate across the groups."""
    if not hsdp:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    per_node = shard_size or info.local_world_size
    if per_node < 1 or info.world_size % per_node:
        raise ValueError(f"HSDP needs the world size ({info.world_size}) to be a multiple of the shard group size "
                         f"({per_node})")
    return init_device_mesh(info.device.type, (info.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
