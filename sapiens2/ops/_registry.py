"""Which backend implements which op. Implementations are imported on first use only."""

from .backend import register_impl  # noqa: F401

# The Triton adapters (sapiens2/ops/_triton.py) register here once the kernels land.
