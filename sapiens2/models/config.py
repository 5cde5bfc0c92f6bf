"""Architecture configs: the official zoo as dataclasses, plus custom sizes for tests and research."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a Sapiens2 backbone.

    The official code uses multi-head attention in the first ``mha_early`` and last ``mha_late``
    layers and grouped-query attention with ``num_heads // 2`` KV heads in between; the 4K form
    runs ``num_tokenizer_layers`` window-attention layers (no QK-norm, no RoPE, no LayerScale)
    in front of the trunk.
    """

    name: str
    embed_dims: int
    num_layers: int
    num_heads: int
    ffn_ratio: int = 4
    num_tokenizer_layers: int = 2
    mha_early: int = 8
    mha_late: int = 8
    gqa_kv_ratio: int = 2
    n_storage_tokens: int = 8
    window_size: int = 4
    rope_base: float = 100.0

    def __post_init__(self):
        if self.embed_dims % self.num_heads:
            raise ValueError(
                f"embed_dims={self.embed_dims} must be divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim={self.head_dim} (embed_dims / num_heads) must be divisible by 4 for 2D RoPE"
            )
        if self.num_heads % self.gqa_kv_ratio:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by gqa_kv_ratio={self.gqa_kv_ratio}"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dims // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return self.embed_dims * self.ffn_ratio

    def num_kv_heads(self, layer: int) -> int:
        """KV heads of trunk layer ``layer``: all heads for the MHA layers, a fraction for GQA ones."""
        if layer < self.mha_early or layer >= self.num_layers - self.mha_late:
            return self.num_heads
        return self.num_heads // self.gqa_kv_ratio

    def gqa_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.num_kv_heads(i) != self.num_heads]

    def with_(self, **changes) -> "ArchConfig":
        return replace(self, **changes)


ARCH_ZOO: dict[str, ArchConfig] = {
    c.name: c
    for c in (
        ArchConfig("sapiens2_0.1b", embed_dims=768, num_layers=12, num_heads=12, num_tokenizer_layers=2),
        ArchConfig("sapiens2_0.4b", embed_dims=1024, num_layers=24, num_heads=16, num_tokenizer_layers=2),
        ArchConfig("sapiens2_0.8b", embed_dims=1280, num_layers=32, num_heads=16, num_tokenizer_layers=3),
        ArchConfig("sapiens2_1b", embed_dims=1536, num_layers=40, num_heads=24, num_tokenizer_layers=4),
        ArchConfig("sapiens2_5b", embed_dims=2432, num_layers=56, num_heads=32, num_tokenizer_layers=6),
    )
}


def get_arch(arch: "str | ArchConfig") -> ArchConfig:
    """Resolve a zoo name (case-insensitive) or pass an ``ArchConfig`` through."""
    if isinstance(arch, ArchConfig):
        return arch
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a zoo name or an ArchConfig, got {type(arch).__name__}")
    key = arch.lower()
    if key not in ARCH_ZOO:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_ZOO)} or an ArchConfig")
    return ARCH_ZOO[key]
