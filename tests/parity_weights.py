"""Deterministic weights and inputs for the parity fixtures, shared by the fixture script (which feeds
them to the official module) and the tests (which feed them to ours): fixtures at real widths store
only the parameter list, the seeds and the official outputs, not megabytes of weights.

Values come from numpy's legacy ``RandomState`` (a frozen stream), scaled so that every path matters:
norm weights ``1 + 0.2 n``, LayerScale ``0.5 n``, matrices ``n / sqrt(fan_in)``, other vectors
``0.1 n``, in the order of the official ``state_dict``."""

from __future__ import annotations

import numpy as np
import torch


def weights(names_shapes, seed: int) -> dict:
    rs = np.random.RandomState(seed)
    out = {}
    for name, shape in names_shapes:
        n = torch.from_numpy(rs.standard_normal(shape).astype(np.float32)) if len(shape) else torch.tensor(
            np.float32(rs.standard_normal()))
        if name.endswith(("ln1.weight", "ln2.weight", "norm.weight")):
            t = 1 + 0.2 * n
        elif name.endswith("gamma.weight"):
            t = 0.5 * n
        elif len(shape) >= 2:
            t = n / float(np.prod(shape[1:])) ** 0.5
        else:
            t = 0.1 * n
        out[name] = t
    return out


def image(shape, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))
