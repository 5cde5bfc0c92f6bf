"""The tolerance rule of every kernel test: max-abs error vs float64 <= 2 x (max-abs error of the same
plain-PyTorch computation run in the low precision) + 1 ulp of the output dtype at the float64
output's scale."""

import torch

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(name, got, exact, low, dtype):
    exact = exact.double()
    ref_err = (low.double() - exact).abs().max().item() if exact.numel() else 0.0
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    bound = 2 * ref_err + ULP[dtype] * max(exact.abs().max().item() if exact.numel() else 0.0, 1e-30)
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(exact.shape)}"
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e})"


def plain_grads(fn, inputs, dtype, g):
    """fn's output and the gradients of <output, g> w.r.t. every non-None input, in ``dtype``."""
    xs = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, [x for x in xs if x is not None], g.to(dtype))
    return out.detach(), grads
