"""``pip install .`` (non-editable, no build isolation) gives ``sapiens2`` with ``sapiens2.kernels``
and its data, and no top-level ``kernels`` module (that name belongs to another PyPI package)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_non_editable_install(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "SAPIENS2_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target",
                    str(target), ROOT], check=True, env=env, capture_output=True, cwd=tmp_path)
    assert (target / "sapiens2" / "kernels" / "attention.py").exists()
    assert (target / "sapiens2" / "data" / "model_card.json").exists()
    assert not (target / "kernels").exists()
    code = ("import sapiens2, sapiens2.kernels.rms_norm as k; from sapiens2.flops import zoo_table; "
            "assert k.__file__.startswith(%r); print(len(zoo_table()))" % str(target))
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "6"
