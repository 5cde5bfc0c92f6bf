"""Pretraining configuration and presets.

``tiny`` is a try-out for a CPU (a few-million-parameter model, 64x48 views, fp32) that trains in
about a minute. The zoo presets (``0.4b`` ... ``5b``) use the paper's recipe where it speaks and
DINOv3's where it is silent (docs/pretraining.md gives the reasons for each choice):

* views: 2 global crops at 1024x768 (scale 0.32-1) and 8 local crops at 512x384 (scale 0.05-0.32,
  DINOv3's ranges); with mask ratio 0.75 a masked global view keeps 768 of 3072 tokens, exactly a
  local view's 768, so all views go through the student as one dense batch (no padding);
* DINO head: 3-layer MLP, hidden 2048, bottleneck 256, 65536 prototypes (DINOv2/v3 ViT-L);
  student temperature 0.1, teacher 0.04 -> 0.07 over the warm-up, Sinkhorn-Knopp (3 iterations),
  teacher momentum 0.994 -> 1.0 (cosine), last layer frozen for the first 1250 steps;
* optimiser: AdamW (0.9, 0.99), peak lr by the sqrt rule w.r.t. batch 1024, cosine to 1e-6,
  weight decay 0.04 -> 0.2, clip 3.0, layer-wise decay 0.9 (0.98 for the 5B, as DINOv3's 7B);
* KoLeo 0.1 on the student's global [CLS] (DINOv2/v3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.config import ARCH_ZOO, ArchConfig, get_arch
from ..train.config import DataConfig, OptimConfig, RunConfig


@dataclass
class ModelConfig:
    """A zoo architecture, or a custom size when ``embed_dims`` > 0."""

    arch: str = "sapiens2_1b"
    embed_dims: int = 0
    num_layers: int = 0
    num_heads: int = 0
    mha_early: int = 8
    mha_late: int = 8
    patch_size: int = 16
    use_tokenizer: bool = False
    layer_scale_init: float = 1e-4  # the official initialisation of LayerScale

    def arch_config(self) -> ArchConfig:
        if self.embed_dims:
            return ArchConfig(self.arch, embed_dims=self.embed_dims, num_layers=self.num_layers,
                              num_heads=self.num_heads, mha_early=self.mha_early, mha_late=self.mha_late)
        return get_arch(self.arch)


@dataclass
class ObjectiveConfig:
    """L = L_MAE + lambda_cl * L_CL, over ``n_global`` masked global views and ``n_local`` local views."""

    mask_ratio: float = 0.75
    global_size: tuple[int, int] = (1024, 768)
    local_size: tuple[int, int] = (512, 384)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    n_global: int = 2
    n_local: int = 8
    flips: bool = False
    lambda_cl: float = 1.0
    koleo_weight: float = 0.1  # DINOv2/v3's KoLeo on the student's global [CLS], per global view
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    head_prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 30_000
    centering: str = "sinkhorn"  # "sinkhorn" | "center"
    sinkhorn_iters: int = 3
    center_momentum: float = 0.9
    momentum_start: float = 0.994
    momentum_end: float = 1.0
    freeze_last_layer_steps: int = 1250


@dataclass
class PretrainConfig:
    preset: str = "1b"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, world_size: int = 1) -> None:
        """Clear errors for configurations that cannot run."""
        o, r, d, m = self.objective, self.run, self.data, self.model
        arch = m.arch_config()
        unit = m.patch_size * (arch.window_size if m.use_tokenizer else 1)
        for name, size in (("objective.global_size", o.global_size), ("objective.local_size", o.local_size)):
            if size[0] % unit or size[1] % unit:
                raise ValueError(f"{name}={size[0]}x{size[1]} must be divisible by {unit} "
                                 f"(patch size{' x window' if m.use_tokenizer else ''})")
        for name, size in (("objective.global_size", o.global_size), ("objective.local_size", o.local_size)):
            if size[0] > d.image_size[0] or size[1] > d.image_size[1]:
                raise ValueError(f"data.image_size={d.image_size[0]}x{d.image_size[1]} is smaller than "
                                 f"{name}={size[0]}x{size[1]}: the crops are cut from the image")
        if not 0 <= o.mask_ratio < 1:
            raise ValueError(f"objective.mask_ratio must be in [0, 1), got {o.mask_ratio}")
        if o.n_global < 1 or o.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {o.n_global}, {o.n_local}")
        if o.centering not in ("sinkhorn", "center"):
            raise ValueError(f"objective.centering must be 'sinkhorn' or 'center', got {o.centering!r}")
        if r.precision not in ("bf16", "fp32"):
            raise ValueError(f"run.precision must be 'bf16' or 'fp32', got {r.precision!r}")
        if r.activation_checkpointing not in ("none", "selective", "full"):
            raise ValueError("run.activation_checkpointing must be 'none', 'selective' or 'full', got "
                             f"{r.activation_checkpointing!r}")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.optim.schedule!r}")
        if r.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {r.steps}")
        if r.global_batch % (world_size * r.grad_accum):
            raise ValueError(f"run.global_batch={r.global_batch} must be divisible by the world size ({world_size}) "
                             f"x run.grad_accum ({r.grad_accum})")


def _zoo(arch: str, lr_1024: float, layerwise_decay: float, tokenizer: bool = False) -> PretrainConfig:
    cfg = PretrainConfig(preset=arch.split("_")[1], model=ModelConfig(arch=arch, use_tokenizer=tokenizer))
    cfg.optim.lr = lr_1024 * (cfg.run.global_batch / 1024) ** 0.5  # DINOv3's sqrt_wrt_1024 rule
    cfg.optim.layerwise_decay = layerwise_decay
    cfg.run.activation_checkpointing = "full"
    cfg.run.compile = True
    cfg.data.image_size = (1024, 768)
    return cfg


def _four_k(cfg: PretrainConfig) -> PretrainConfig:
    """The 4K form: 4096x3072 global views (masking acts on windows, after the local stage)."""
    cfg.objective.global_size, cfg.objective.local_size = (4096, 3072), (2048, 1536)
    cfg.data.image_size = (4096, 3072)
    cfg.preset = cfg.preset + "_4k"
    return cfg


def tiny() -> PretrainConfig:
    """A CPU try-out whose [CLS] learns within a few hundred steps (the k-NN probe of
    ``sapiens2.bench.pretrain_probe`` checks it). Where it departs from the zoo recipe, and why:

    * LayerScale starts at 1, not the official 1e-4: with 4 blocks and a few hundred steps, residual
      branches at 1e-4 leave every image's [CLS] the same vector to ~1e-5, so the teacher's logits are
      too, the Sinkhorn targets are exactly uniform and the self-distillation sits at loss log K;
    * a sharp teacher (0.01 throughout), a fast EMA (0.9 -> 0.99) and a lower peak lr (2e-4): a few
      hundred steps, not 500k;
    * KoLeo at DINOv3's 0.1, as the zoo presets: without it the [CLS] features of a small batch bunch
      together and the probe falls below initialisation (docs/pretraining.md has the ablation).
    """
    cfg = PretrainConfig(
        preset="tiny",
        model=ModelConfig(arch="tiny", embed_dims=96, num_layers=4, num_heads=4, mha_early=1, mha_late=1,
                          patch_size=8, layer_scale_init=1.0),
        objective=ObjectiveConfig(global_size=(64, 48), local_size=(32, 24), n_local=4, decoder_width=64,
                                  decoder_depth=1, decoder_heads=4, head_prototypes=256, head_hidden=128,
                                  head_bottleneck=32, teacher_temp=0.01, warmup_teacher_temp=0.01,
                                  teacher_temp_warmup_steps=20, momentum_start=0.9, momentum_end=0.99,
                                  freeze_last_layer_steps=5),
        optim=OptimConfig(lr=2e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.04, weight_decay_end=0.04,
                          layerwise_decay=1.0, patch_embed_lr_mult=1.0, fused=False),
        run=RunConfig(steps=60, global_batch=16, precision="fp32", log_every=5, checkpoint_every=20),
        data=DataConfig(source="synthetic", image_size=(96, 72), num_workers=0, synthetic_count=512),
    )
    return cfg


PRESETS = {
    "tiny": tiny,
    "0.4b": lambda: _zoo("sapiens2_0.4b", 4e-4, 0.9),
    "0.8b": lambda: _zoo("sapiens2_0.8b", 3e-4, 0.9),
    "1b": lambda: _zoo("sapiens2_1b", 2e-4, 0.9),
    "5b": lambda: _zoo("sapiens2_5b", 1e-4, 0.98),
    "1b_4k": lambda: _four_k(_zoo("sapiens2_1b", 2e-4, 0.9, tokenizer=True)),
}
assert all(f"sapiens2_{k}" in ARCH_ZOO for k in ("0.4b", "0.8b", "1b", "5b"))


def get_preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


__all__ = ["ModelConfig", "ObjectiveConfig", "PretrainConfig", "PRESETS", "get_preset", "tiny"]
