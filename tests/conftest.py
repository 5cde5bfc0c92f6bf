"""Test-session set-up.

Triton's interpreter mode is process-wide and fixed when the first kernel is decorated, so it is
decided here, before any test module is imported: without a GPU every Triton kernel runs under the
interpreter on CPU tensors (``tests/kernels``). With a GPU the compiled kernels run instead; the
GPU tests (marker ``gpu``) are then run in their own pytest process (see the Makefile), since the
CPU-tensor kernel tests need the interpreter.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # plain_reference and fixtures helpers


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
