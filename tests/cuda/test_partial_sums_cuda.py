"""``partial_sums`` on the ``"cuda"`` backend (``s2_column_sum``, the reduction that finishes the CUDA
kernels' weight gradients), executed by the CPU emulation: column sums of fp32 partial rows vs
float64, rounded once to the output dtype (at most half an ulp of the output dtype from the float64
sum, plus the fp32 accumulation); the fixed summation order (bitwise repeatable); opcheck; errors."""

import pytest
import torch



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 300), (528, 96), (3072, 257)])  # 528 = 4 x 132 SMs
def test_partial_sums(rows, cols, dtype, emulated_cuda):
    part = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    got = torch.ops.sapiens2.partial_sums(part, dtype)
    exact = part.double().sum(0)
    assert got.dtype == dtype and got.shape == (cols,)
    # fp32 accumulation of `rows` terms (rows * 2^-24 relative to the sum of magnitudes) + the final rounding
    bound = rows * 2.0**-24 * part.double().abs().sum(0) + torch.finfo(dtype).eps * exact.abs()
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(torch.ops.sapiens2.partial_sums(part, dtype), got)  # one fixed order, no atomics


def test_partial_sums_opcheck(emulated_cuda):
    part = torch.randn(9, 40)
    torch.library.opcheck(torch.ops.sapiens2.partial_sums, (part, torch.bfloat16))
    torch.library.opcheck(torch.ops.sapiens2_emu.partial_sums, (part, torch.float32))


def test_partial_sums_binding_errors(emulated_cuda):
    E = torch.ops.sapiens2_emu
    with pytest.raises(TypeError, match="part must be float32"):
        E.partial_sums(torch.randn(3, 4, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="part must be a \\(rows, columns\\)"):
        E.partial_sums(torch.randn(3, 4, 5), torch.float32)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        E.partial_sums(torch.randn(3, 4), torch.int32)
