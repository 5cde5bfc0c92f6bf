"""sapiens2: fast kernels and a lean PyTorch model for Meta's Sapiens2 vision transformers."""

__version__ = "0.1.0"

from . import ops  # noqa: E402
from .checkpoint import infer_config, load_checkpoint  # noqa: E402
from .models import ARCH_ZOO, ArchConfig, Sapiens2Backbone  # noqa: E402

__all__ = ["ARCH_ZOO", "ArchConfig", "Sapiens2Backbone", "infer_config", "load_checkpoint", "ops"]
