import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # plain_reference and fixtures helpers


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
