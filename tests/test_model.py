"""Model behaviour beyond official parity: MAE masking, meta-device construction, init, errors."""

import pytest
import torch

from sapiens2 import ArchConfig, Sapiens2Backbone, load_checkpoint

TINY = ArchConfig("tiny", embed_dims=32, num_layers=18, num_heads=2, num_tokenizer_layers=2)


def _model(tok, **kw):
    torch.manual_seed(0)
    m = Sapiens2Backbone(TINY, use_tokenizer=tok, rope_dtype="fp32", **kw).eval()
    with torch.no_grad():  # LayerScale at 1e-4 would hide the attention branch
        for b in m.blocks:
            b.attn.gamma.weight.normal_()
    return m


@pytest.mark.parametrize("tok,img", [(False, (96, 64)), (True, (128, 192))])
def test_visible_ids_equal_gathering_after_the_local_stage(tok, img):
    """Masking after the local stage: the masked forward equals embedding everything, gathering the
    visible trunk tokens, and running the trunk on them with their RoPE positions."""
    m = _model(tok)
    x = torch.randn(2, 3, *img)
    _, (th, tw) = m.grids(*img)
    n = th * tw
    ids = torch.stack([torch.randperm(n)[: n // 2].sort().values for _ in range(2)])
    with torch.no_grad():
        masked = m(x, ids)
        full_tokens, _ = m.embed(x)
        gathered = torch.gather(full_tokens, 1, ids[:, :, None].expand(-1, -1, TINY.embed_dims))
        sin, cos = m.rope_embed(th, tw)
        ref = m.forward_tokens(gathered, (sin[ids], cos[ids]))
    assert masked.shape == (2, 9 + n // 2, TINY.embed_dims)
    assert (masked - ref).abs().max().item() < 1e-5


def test_visible_ids_with_all_tokens_equals_unmasked():
    m = _model(True)
    x = torch.randn(1, 3, 128, 192)
    ids = torch.arange(6)[None]
    with torch.no_grad():
        assert (m(x, ids) - m(x)).abs().max().item() < 1e-5


def test_meta_construction_then_init():
    m = Sapiens2Backbone("sapiens2_5b", device="meta")
    assert all(p.is_meta for p in m.parameters())
    tiny = Sapiens2Backbone(TINY, use_tokenizer=True, device="meta")
    tiny.to_empty(device="cpu")
    tiny.init_weights()
    sd = tiny.state_dict()
    assert torch.all(sd["blocks.0.ln1.weight"] == 1)
    assert torch.allclose(sd["blocks.3.attn.gamma.weight"], torch.full((32,), 1e-4))
    assert torch.all(sd["blocks.0.attn.wq.bias"] == 0)
    std = sd["blocks.0.ffn.w12.weight"].std().item()
    assert 0.015 < std < 0.025
    assert torch.allclose(sd["rope_embed.periods"].float(), 100 ** (2 * torch.arange(4) / 8), rtol=1e-2)


def test_meta_forward_backward_full_size():
    m = Sapiens2Backbone("sapiens2_0.4b", use_tokenizer=True, device="meta")
    x = torch.empty(1, 3, 4096, 3072, device="meta")
    out = m(x)
    assert out.shape == (1, 9 + 64 * 48, 1024)
    out.sum().backward()
    assert m.blocks[10].attn.wqkv.weight.grad.shape == (1024 + 2 * 512, 1024)  # packed q, k, v (GQA layer)
    assert m.state_dict()["blocks.10.attn.wk.weight"].shape == (512, 1024)  # official names outside


def test_bad_inputs(tmp_path):
    m = _model(False)
    with pytest.raises(ValueError, match="divisible by the patch size 16"):
        m(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        m(torch.randn(1, 4, 96, 64))
    with pytest.raises(ValueError, match="sorted"):
        m(torch.randn(1, 3, 96, 64), torch.tensor([[3, 1]]))
    with pytest.raises(TypeError, match="int64"):
        m(torch.randn(1, 3, 96, 64), torch.tensor([[1, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        m(torch.randn(1, 3, 96, 64), torch.tensor([[1, 24]]))
    with pytest.raises(ValueError, match="window 4 = 64"):
        _model(True)(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="unknown arch"):
        Sapiens2Backbone("sapiens2_2b")
    with pytest.raises(ValueError, match="out_type"):
        Sapiens2Backbone(TINY, out_type="tokens")
    sd = m.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "ln1.weight"})
    with pytest.raises(ValueError, match="unexpected keys"):
        m.load_state_dict({**sd, "head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.wq.weight: checkpoint \(32, 16\)"):
        m.load_state_dict({**sd, "blocks.0.attn.wq.weight": torch.zeros(32, 16)})
    pkl = tmp_path / "w.pth"
    torch.save(sd, pkl)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_checkpoint(pkl)
    assert set(load_checkpoint(pkl, trust_pickle=True)) == set(sd)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.safetensors")
