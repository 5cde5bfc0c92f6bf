"""``torch.compile(fullgraph=True)`` over the model: the trunk, the 4K tokenizer, and the masked paths
(``visible_ids`` and ``seq_lens``) trace without graph breaks and without a host sync per layer, forward
and backward (``aot_eager`` on the CPU: the custom ops' fakes and autograd formulas are what compile)."""

import pytest
import torch

from sapiens2 import ArchConfig, Sapiens2Backbone

ARCH = ArchConfig("tiny-compile", embed_dims=64, num_layers=4, num_heads=4, num_tokenizer_layers=2, mha_early=1,
                  mha_late=1)  # GQA in the middle layers


def _model(tokenizer: bool):
    torch.manual_seed(0)
    img = (128, 192) if tokenizer else (64, 48)
    return Sapiens2Backbone(ARCH, img_size=img, use_tokenizer=tokenizer).train(), img


def _check(model, fn, *args):
    """Compiled (fullgraph) and eager agree, forward and every parameter gradient; no graph break."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args)
    g = torch.randn_like(out_c)
    grads_c = torch.autograd.grad(out_c, list(model.parameters()), g, allow_unused=True)
    out_e = fn(*args)
    grads_e = torch.autograd.grad(out_e, list(model.parameters()), g, allow_unused=True)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokenizer", [False, True], ids=["trunk", "4k-tokenizer"])
def test_compiles_fullgraph(tokenizer):
    model, (H, W) = _model(tokenizer)
    x = torch.randn(2, 3, H, W)
    _check(model, lambda x: model(x), x)


@pytest.mark.parametrize("tokenizer", [False, True], ids=["trunk", "4k-tokenizer"])
def test_masked_forward_compiles_fullgraph(tokenizer):
    """MAE visible_ids: validated once before the compiled region (check_inputs), not traced."""
    model, (H, W) = _model(tokenizer)
    x = torch.randn(2, 3, H, W)
    n = (H // (16 * model.window)) * (W // (16 * model.window))
    ids = torch.stack([torch.randperm(n)[: n // 2].sort().values for _ in range(2)])
    model.check_inputs(x, visible_ids=ids)
    _check(model, lambda x, ids: model(x, visible_ids=ids), x, ids)


def test_seq_lens_compile_fullgraph():
    model, (H, W) = _model(False)
    n = (H // 16) * (W // 16)
    tokens = torch.randn(2, n, ARCH.embed_dims)
    seq_lens = torch.tensor([9 + n, 9 + n // 2])
    rope = model.rope_tables(H // 16, W // 16)
    model.check_inputs(seq_lens=seq_lens, num_tokens=9 + n)
    _check(model, lambda t, lens: model.forward_tokens(t, rope, lens), tokens, seq_lens)


def test_seq_lens_validated_once_per_forward(monkeypatch):
    """Eager forward with seq_lens: one value check (one device sync) per forward, not one per layer."""
    model, (H, W) = _model(False)
    n = (H // 16) * (W // 16)
    calls = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or real_bool(t))
    model.forward_tokens(torch.randn(2, n, ARCH.embed_dims), model.rope_tables(H // 16, W // 16),
                         torch.tensor([9 + n, 9 + n // 2]))
    assert len(calls) == 1 and ARCH.num_layers > 1
