"""Trainer configuration: dataclasses shared by pretraining and post-training, with overrides.

A run's config is a tree of dataclasses (``optim``, ``train``, ``data``, ... sections). Presets are
functions returning one; the command line changes any leaf with ``--set section.key=value`` (the
value parsed as the field's type: ``true/false``, numbers, ``a,b`` tuples). Unknown keys and values
of the wrong type are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay and precomputed per-step schedules.

    ``lr`` is the peak learning rate, reached after ``warmup_steps`` of linear warm-up, then
    ``schedule="cosine"`` decays it to ``min_lr`` at the last step (``"constant"`` keeps it). Weight
    decay follows a cosine from ``weight_decay`` to ``weight_decay_end``; biases, norm weights,
    LayerScale, the CLS/register/mask tokens and position embeddings get none. Layer ``i`` of ``L``
    (embedding = 0, heads/decoder = L + 1) scales its lr by ``layerwise_decay ** (L + 1 - i)``;
    the patch embedding additionally by ``patch_embed_lr_mult`` (DINOv3)."""

    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "cosine"
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    fused: bool = True


@dataclass
class RunConfig:
    """How the loop runs: length, batch, precision, parallelism, checkpoints, logging."""

    steps: int = 100_000
    global_batch: int = 1024
    grad_accum: int = 1
    seed: int = 0
    precision: str = "bf16"  # "bf16": FSDP2 MixedPrecisionPolicy (fp32 master + reductions); "fp32"
    activation_checkpointing: str = "none"  # "none" | "selective" (every other block) | "full"
    compile: bool = False  # torch.compile each block
    hsdp: bool = False  # shard within a group of ranks, replicate across the groups
    hsdp_shard_size: int = 0  # ranks per shard group with hsdp (0: the ranks of one node, LOCAL_WORLD_SIZE)
    deterministic: bool = False  # deterministic attention backward + torch deterministic algorithms
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every k-th step's checkpoint (0: none)
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    progress: bool = True


@dataclass
class DataConfig:
    """``source``: an image folder, a ``.txt`` list, a ``.jsonl`` manifest or ``"synthetic"``.
    Images are decoded in the workers, resized to cover ``image_size`` and centre-cropped to it:
    the canvas the views are cut from."""

    source: str = "synthetic"
    image_size: tuple[int, int] = (1024, 768)
    num_workers: int = 4
    synthetic_count: int = 4096


_SCALARS = {int: int, float: float, str: str}


def _parse(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if typ is bool:
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if origin is tuple:
        args = typing.get_args(typ)
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()] if args and args[0] is int else \
            [p for p in value.split(",") if p.strip()]
        if len(parts) != len(args):
            raise ValueError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_parse(p, a, key) for p, a in zip(parts, args))
    if typ in _SCALARS:
        try:
            return _SCALARS[typ](value)
        except ValueError:
            raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    raise TypeError(f"{key}: cannot set a field of type {typ} from the command line")


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``section.key=value`` strings to a (nested) dataclass config, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, value = item.split("=", 1)
        *parents, leaf = path.strip().split(".")
        node = cfg
        for p in parents:
            if not dataclasses.is_dataclass(node) or p not in {f.name for f in dataclasses.fields(node)}:
                raise ValueError(f"unknown config section {p!r} in {path!r}; sections: {section_names(node)}")
            node = getattr(node, p)
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if leaf not in fields:
            raise ValueError(f"unknown config key {path!r}; {'.'.join(parents) or 'top level'} has: {sorted(fields)}")
        hints = typing.get_type_hints(type(node))
        setattr(node, leaf, _parse(value, hints[leaf], path))
    return cfg


def section_names(node: Any) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)


def from_dict(cls, d: dict):
    """Rebuild a nested dataclass from ``to_dict`` output (tuples restored from lists)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = from_dict(t, v)
        elif typing.get_origin(t) is tuple:
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


__all__ = ["OptimConfig", "RunConfig", "DataConfig", "apply_overrides", "to_dict", "to_json", "from_dict", "field"]
