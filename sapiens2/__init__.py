"""sapiens2: fast kernels and a lean PyTorch model for Meta's Sapiens2 vision transformers."""

__version__ = "0.1.0"
