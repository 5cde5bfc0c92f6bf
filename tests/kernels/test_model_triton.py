"""The whole model, forward and backward, on the Triton backend (interpreter, CPU) vs the reference
backend: every op the blocks use dispatches to its kernel (strict: no silent fallback)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from sapiens2 import ArchConfig, Sapiens2Backbone  # noqa: E402
from sapiens2.ops import use_backend  # noqa: E402

# 3 layers: MHA, GQA, MHA (the official MHA/GQA/MHA layout, shortened)
TINY = ArchConfig("tiny", embed_dims=128, num_layers=3, num_heads=2, mha_early=1, mha_late=1,
                  num_tokenizer_layers=2)


def _grads(model, x, ids, backend):
    model.zero_grad(set_to_none=True)
    with use_backend(backend, strict=backend == "triton"):
        out = model(x, ids)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("tok,img,masked", [(False, (64, 48), False), (False, (64, 48), True), (True, (128, 64), True)])
def test_model_on_triton_matches_reference(tok, img, masked):
    torch.manual_seed(0)
    model = Sapiens2Backbone(TINY, use_tokenizer=tok, rope_dtype="fp32").train()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.gamma.weight.normal_()  # make the attention branch matter
    x = torch.randn(2, 3, *img)
    _, (th, tw) = model.grids(*img)
    ids = torch.stack([torch.randperm(th * tw)[: (th * tw + 1) // 2].sort().values for _ in range(2)]) if masked else None
    out_r, g_r = _grads(model, x, ids, "reference")
    out_t, g_t = _grads(model, x, ids, "triton")
    scale = out_r.abs().max().item()
    assert (out_t - out_r).abs().max().item() <= 1e-4 * scale
    assert g_r.keys() == g_t.keys()
    # some gradients are zero in exact arithmetic (a key bias shifts every score of a query equally)
    # and pure rounding noise in both backends: measure those against the model's gradient scale
    floor = 1e-6 * max(g.abs().max().item() for g in g_r.values())
    for name in g_r:
        err = (g_t[name] - g_r[name]).abs().max().item()
        assert err <= 1e-4 * g_r[name].abs().max().item() + floor, name
