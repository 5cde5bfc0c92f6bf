"""Pretraining: pixel-anchored MAE + [CLS] self-distillation (Sapiens2's joint objective)."""

from .config import PRESETS, PretrainConfig, get_preset

__all__ = ["PRESETS", "PretrainConfig", "get_preset"]
