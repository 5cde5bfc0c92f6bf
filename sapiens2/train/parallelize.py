"""The parallelize step, applied to a model written for one device (torchtitan's order):
activation checkpointing, then ``torch.compile`` per block, then FSDP2 ``fully_shard`` on every
block and on the root.

* Checkpointing ``"full"`` recomputes every block in backward (keeps only its input);
  ``"selective"`` every other block (half the recompute for about half the activations).
* Mixed precision: FSDP2's ``MixedPrecisionPolicy`` — parameters all-gathered and computed in bf16,
  gradients reduced in fp32 into fp32 sharded master weights (``precision="bf16"``).
* HSDP: a 2-D mesh ``(replicate, shard)`` shards within a node and replicates across nodes.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# FSDP2 warns when a block returns a view (our blocks return (h, pending) where h may be a view of the
# fused add's output); nothing in the trainer writes into a block output in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def mp_policy(precision: str) -> MixedPrecisionPolicy:
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Wrap blocks of ``blocks`` in place with non-reentrant activation checkpointing."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, blk in enumerate(list(blocks)):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleList) -> None:
    for blk in blocks:
        blk.compile(fullgraph=False)


def shard(root: nn.Module, units: Sequence[nn.Module], mesh: DeviceMesh, precision: str,
          reshard_after_forward: bool = True) -> FSDPModule:
    """``fully_shard`` each unit (their parameters all-gathered together, once per forward and once per
    backward), then the root (what is left: embeddings, tokens, final norm)."""
    policy = mp_policy(precision)
    for u in units:
        fully_shard(u, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return root


def local_tensors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of (possibly DTensor) parameters."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]
