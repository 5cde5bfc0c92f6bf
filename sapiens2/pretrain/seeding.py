"""Per-sample random streams: a generator for each ``(seed, step, sample, stream)``.

Pretraining draws crops and masks per sample. Making each draw a function of the global sample
index (not of the rank, the worker or the order of processing) is what lets a run resume bit for
bit and re-shard over another number of ranks without changing what any sample sees."""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, step: int, sample: int, stream: tuple) -> int:
    """A 63-bit seed mixing every coordinate (a hash, so nearby coordinates give unrelated streams)."""
    key = f"{seed}/{step}/{sample}/{'/'.join(map(str, stream))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, sample: int, stream: tuple) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(stream_seed(seed, step, sample, stream))
    return g
