"""Every custom op on the Triton backend (interpreter): ``opcheck`` (schema, fake tensors, autograd
registration, AOT dispatch) and agreement with the reference backend through the public API."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import sapiens2.ops as ops  # noqa: E402


def _g(*s):
    return torch.randn(*s, requires_grad=True)


def _r(*s):
    return torch.randn(*s)


SIN, COS = torch.rand(7, 64), torch.rand(7, 64)
CASES = {
    "attention": (_g(2, 9, 4, 64), _g(2, 9, 2, 64), _g(2, 9, 2, 64), _g(64), _g(64), SIN, COS, 2,
                  torch.tensor([9, 4]), 0.125, 1e-6),
    "attention_plain": (_g(1, 5, 2, 80), _g(1, 5, 2, 80), _g(1, 5, 2, 80), None, None, None, None, 0, None, 0.1, 1e-6),
    "attention_qkv": (_g(2, 9, 8, 64), 4, _g(64), _g(64), SIN, COS, 2, torch.tensor([9, 4]), 0.125, 1e-6),
    "window_attention": (_g(2, 32, 2, 64), _g(2, 32, 2, 64), _g(2, 32, 2, 64), _g(2, 2, 2, 64), _g(2, 2, 2, 64),
                         _g(2, 2, 2, 64), None, 4, 8, 4, "grid", 0.125),
    "cls_pool": (_g(2, 2, 2, 64), _g(2, 2, 2, 64), _g(2, 2, 2, 64), _g(2, 32, 2, 64), _g(2, 32, 2, 64), 8, 4, 4,
                 "windows", 0.125),
    "rms_norm": (_g(3, 5, 96), _g(96), 1e-6),
    "add_rms_norm": (_g(3, 96), _g(3, 96), _g(96), _g(96), 1e-6),
    "swiglu": (_g(4, 2, 200),),
    "swiglu_recompute_backward": (_r(4, 2, 100), _r(4, 2, 200), True),
    "qk_norm_rope": (_g(2, 9, 4, 64), _g(2, 9, 2, 64), _g(64), _g(64), SIN, COS, 2, 1e-6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck_and_match_reference(name):
    op = getattr(torch.ops.sapiens2, name.replace("_plain", "")).default
    args = CASES[name]
    with ops.use_backend("triton", strict=True):
        torch.library.opcheck(op, args)
        out_t = op(*args)
    out_r = op(*args)
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    for t, r in zip(as_tuple(out_t), as_tuple(out_r)):
        assert t.shape == r.shape and t.dtype == r.dtype
        if t.numel():
            assert (t - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item())
