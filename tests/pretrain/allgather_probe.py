"""Run under torchrun by test_trainer.py: count FSDP2 all-gathers of one pretraining student step."""

import json
import sys

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from sapiens2.pretrain.config import tiny
from sapiens2.pretrain.masking import random_visible_ids
from sapiens2.pretrain.objective import PretrainStudent
from sapiens2.pretrain.trainer import Pretrainer
from sapiens2.train.config import apply_overrides
from sapiens2.train.distributed import init_distributed, make_mesh, shutdown
from sapiens2.train.parallelize import shard

info = init_distributed("cpu")
cfg = apply_overrides(tiny(), ["objective.n_local=2"])
torch.manual_seed(0)
st = PretrainStudent(cfg)
units = Pretrainer._units(st)
st = shard(st, units, make_mesh(info), "fp32")
calls = []
real = _fsdp_param_group.foreach_all_gather
_fsdp_param_group.foreach_all_gather = lambda *a, **k: calls.append(1) or real(*a, **k)
g, loc = torch.randn(4, 3, 64, 48), torch.randn(4, 3, 32, 24)
vis = random_visible_ids(48, 0.75, torch.arange(4), seed=0, step=0, view=0)
counts = {"units": len(units), "blocks": len(st.backbone.blocks)}
px, lg, _ = st(g, vis, loc)
counts["forward"] = len(calls)
calls.clear()
(px.square().mean() + lg.square().mean()).backward()
counts["backward"] = len(calls)
calls.clear()
st(g, vis, None)  # a second call per step (e.g. one per view group) gathers everything again
st(g, vis, None)
counts["two_more_calls"] = len(calls)
if info.rank == 0:
    print("COUNTS " + json.dumps(counts))
    sys.stdout.flush()
shutdown(info)
