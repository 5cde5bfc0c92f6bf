"""The CUDA kernels of csrc/ run here through the CPU emulation (csrc/emu/cuda_emu.h): the
torch-free library for direct launches with byte accounting (``emu_lib``), and the torch bindings
built for the emulation behind the ``"cuda"`` backend (``emulated_cuda``). Both skip with the reason
when no host C++ compiler is available."""

import pytest

from sapiens2.cuda_tools import emu


@pytest.fixture(scope="session")
def emu_lib():
    try:
        return emu.load()
    except emu.EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def _emu_ext():
    from sapiens2.cuda_tools import emu_ext

    try:
        emu_ext.load()
    except emu.EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def emulated_cuda(_emu_ext):
    """Inside the test, ``sapiens2`` ops on the ``"cuda"`` backend (strict) run the emulated kernels."""
    from sapiens2.ops import use_backend
    from sapiens2.ops.cuda import emulated

    with emulated(), use_backend("cuda", strict=True):
        yield


@pytest.fixture(params=[False, True], ids=["forward-order", "reverse-order"])
def schedule(request, emu_lib):
    """Run the block's threads in both orders: a result that depends on it means a missing barrier."""
    emu_lib.set_reverse(request.param)
    yield request.param
    emu_lib.set_reverse(False)
