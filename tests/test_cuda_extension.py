"""The compiled extension ``sapiens2._C`` (built by ``pip install --no-build-isolation -e .`` when
nvcc and a CUDA torch are present; skipped here when it is not built), checked without a GPU:
it imports without a driver, registers every op schema that ``csrc/bindings`` declares (with a
CUDA and a CPU kernel and a fake), refuses CPU tensors with a ValueError that says CUDA tensors are
needed, gives the right output shapes on meta tensors, and shows up in ``available_backends`` and
``sapiens2 info``. A built extension that fails to import is a failure, not a skip."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sapiens2.cuda_tools.sources import csrc_dir

_SPEC = importlib.util.find_spec("sapiens2._C")
pytestmark = pytest.mark.skipif(
    _SPEC is None, reason="sapiens2._C is not built (pip install --no-build-isolation -e . with nvcc and a CUDA "
                          "torch builds it; SAPIENS2_BUILD_CUDA=0 skips it)")
NS = "sapiens2_cuda"


@pytest.fixture(scope="module")
def ext():
    mod = importlib.import_module("sapiens2._C")  # built: must import (no skip on a broken build)
    from sapiens2.ops.cuda import load_extension

    load_extension()
    return mod


def _declared_ops() -> set[str]:
    """Op names the binding sources declare (``m.def("name(...``)."""
    root = csrc_dir()
    assert root is not None
    names = set()
    for p in sorted((root / "bindings").glob("*.cpp")):
        names |= set(re.findall(r'm\.def\(\s*"(\w+)\(', p.read_text()))
    return names


def _registered_ops() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NS + "::")}


def test_imports_without_a_gpu_driver():
    code = ("import torch, sapiens2._C; print(torch.ops.sapiens2_cuda.rms_norm_fwd); "
            "print(torch.cuda.is_available())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["sapiens2_cuda.rms_norm_fwd", "False"], r.stdout


def test_every_declared_schema_is_registered(ext):
    declared, registered = _declared_ops(), _registered_ops()
    assert {"rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_bwd"} <= declared
    missing = declared - registered
    assert not missing, (f"ops declared in csrc/bindings but not in the built extension: {sorted(missing)} "
                         "(stale build? reinstall: pip install --no-build-isolation -e .)")
    from torch._library.simple_registry import singleton

    for name in sorted(registered):
        qual = f"{NS}::{name}"
        for key in ("CUDA", "CPU"):  # CPU: the registration that refuses CPU tensors with a clear message
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, key), (qual, key)
        assert singleton.find(qual).fake_impl.kernel is not None, f"{qual} has no fake implementation"


def _cpu_argument(t):
    kind = t.kind()
    values = {"TensorType": lambda: torch.randn(2, 64), "OptionalType": lambda: None, "FloatType": lambda: 1e-6,
              "IntType": lambda: 1, "BoolType": lambda: False, "StringType": lambda: "none"}
    if kind not in values:
        pytest.fail(f"no test value for an argument of type {t}")
    return values[kind]()


def test_cpu_tensors_raise_a_value_error_asking_for_cuda(ext):
    for name in sorted(_registered_ops()):
        op = getattr(getattr(torch.ops, NS), name).default
        args = [_cpu_argument(a.type) for a in op._schema.arguments]
        with pytest.raises(ValueError, match="must be a CUDA tensor.*GPU tensors only") as info:
            op(*args)
        assert str(info.value).startswith(name + ":"), info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fakes_on_meta_tensors(ext, dtype):
    ops = getattr(torch.ops, NS)
    x, w = torch.empty(4, 7, 64, device="meta", dtype=dtype), torch.empty(64, device="meta", dtype=dtype)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-6)
    assert (y.shape, y.dtype, y.device.type) == (x.shape, dtype, "meta")
    assert (rstd.shape, rstd.dtype) == ((4, 7), torch.float32)
    y, h, rstd = ops.add_rms_norm_fwd(x, torch.empty_like(x), w, w, 1e-6)
    assert (y.shape, h.shape, h.dtype, rstd.shape, rstd.dtype) == (x.shape, x.shape, dtype, (4, 7), torch.float32)
    dx, dw = ops.rms_norm_bwd(torch.empty_like(x), x, w, rstd)
    assert (dx.shape, dx.dtype, dw.shape, dw.dtype) == (x.shape, dtype, w.shape, dtype)
    dres, dx, dw, ds = ops.add_rms_norm_bwd(torch.empty_like(x), torch.empty_like(x), x, h, w, w, rstd)
    assert (dres.shape, dx.shape, dw.shape, ds.shape) == (x.shape, x.shape, w.shape, w.shape)


def test_available_backends_and_info_say_built(ext):
    from sapiens2.ops.backend import available_backends

    assert available_backends()["cuda"].startswith("built"), available_backends()
    out = subprocess.run([sys.executable, "-m", "sapiens2.cli", "info", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["backends"]["cuda"].startswith("built")
    assert info["cuda extension"].startswith(str(os.path.dirname(_SPEC.origin)))
