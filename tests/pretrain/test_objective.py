"""Masking, views and the one-pass student: invariants at small sizes on the reference backend."""

from __future__ import annotations

import pytest
import torch

from sapiens2.models.backbone import Sapiens2Backbone
from sapiens2.models.config import ArchConfig
from sapiens2.pretrain.config import get_preset, tiny
from sapiens2.pretrain.masking import mask_from_visible, num_visible, random_visible_ids
from sapiens2.pretrain.dino import koleo_loss
from sapiens2.pretrain.objective import PretrainStudent, PretrainTeacher, joint_loss
from sapiens2.pretrain.views import CropSpec, multi_crop
from sapiens2.train.config import apply_overrides


def test_visible_ids_invariants():
    ids = torch.tensor([3, 10, 11, 40])
    v = random_visible_ids(48, 0.75, ids, seed=0, step=5, view=0)
    assert v.shape == (4, num_visible(48, 0.75)) == (4, 12)
    assert v.dtype == torch.int64
    assert bool((v[:, 1:] > v[:, :-1]).all())  # sorted and unique
    assert bool(((v >= 0) & (v < 48)).all())
    # a sample's mask depends on (seed, step, sample, view) only: not on the batch it sits in
    alone = random_visible_ids(48, 0.75, ids[2:3], seed=0, step=5, view=0)
    assert torch.equal(alone[0], v[2])
    assert not torch.equal(v, random_visible_ids(48, 0.75, ids, seed=0, step=5, view=1))
    assert not torch.equal(v, random_visible_ids(48, 0.75, ids, seed=0, step=6, view=0))
    mask = mask_from_visible(v, 48)
    assert int(mask.sum(1).unique()) == 36 and not bool(mask.gather(1, v).any())
    assert num_visible(15, 0.5) == 7  # MAE rounds the kept count down
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(10, 1.0)


def test_multi_crop_shapes_determinism_and_errors():
    imgs = (torch.rand(3, 3, 96, 72) * 255).to(torch.uint8)
    ids = torch.tensor([0, 1, 2])
    kw = dict(global_spec=CropSpec((64, 48), (0.32, 1.0)), local_spec=CropSpec((32, 24), (0.05, 0.32)), n_local=4,
              seed=1, step=0)
    g, loc = multi_crop(imgs, ids, **kw)
    assert g.shape == (6, 3, 64, 48) and loc.shape == (12, 3, 32, 24)
    g2, loc2 = multi_crop(imgs, ids, **kw)
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    # view-major: rows 0..2 are view 0 of samples 0..2; sample 1 alone gives the same crops
    g1, _ = multi_crop(imgs[1:2], ids[1:2], **kw)
    assert torch.equal(g1[0], g[1]) and torch.equal(g1[1], g[4])
    # the whole-image box at the image's size is the image; a flipped box is the mirror image
    from sapiens2.pretrain.views import normalize, resized_crops

    x = normalize(imgs)
    box = torch.tensor([[0.0, 0.0, 96.0, 72.0, 0.0]]).repeat(3, 1)
    torch.testing.assert_close(resized_crops(x, box, (96, 72)), x, atol=1e-4, rtol=1e-4)
    box[:, 4] = 1.0
    torch.testing.assert_close(resized_crops(x, box, (96, 72)), x.flip(-1), atol=1e-4, rtol=1e-4)
    # boxes stay inside the image, with areas in the scale range
    from sapiens2.pretrain.views import crop_boxes

    b = crop_boxes(torch.Generator().manual_seed(0), 256, (96, 72), CropSpec((32, 24), (0.05, 0.32)))
    assert bool((b[:, 0] >= 0).all() and (b[:, 0] + b[:, 2] <= 96 + 1e-9).all() and (b[:, 1] + b[:, 3] <= 72 + 1e-9).all())
    area = b[:, 2] * b[:, 3] / (96 * 72)
    assert bool((area <= 0.32 + 1e-9).all() and (area >= 0.05 * 0.5).all()) and not bool(b[:, 4].any())
    with pytest.raises(ValueError, match="larger than the images"):
        multi_crop(imgs, ids, global_spec=CropSpec((128, 48), (0.3, 1.0)), local_spec=kw["local_spec"], seed=0, step=0)


def _small_cfg(local=(32, 24)):
    cfg = tiny()
    apply_overrides(cfg, [f"objective.local_size={local[0]},{local[1]}", "objective.n_local=2"])
    return cfg


@pytest.mark.parametrize("local", [(32, 24), (24, 24)])  # equal token counts (dense) and padded (seq_lens)
def test_one_student_pass_equals_per_view_passes(local):
    cfg = _small_cfg(local)
    torch.manual_seed(0)
    st = PretrainStudent(cfg).eval()
    B = 2
    g = torch.randn(2 * B, 3, 64, 48)
    loc = torch.randn(2 * B, 3, *local)
    vis = random_visible_ids(48, 0.75, torch.arange(2 * B), seed=0, step=0, view=0)
    pixels, logits, cls = st(g, vis, loc)
    bb = st.backbone
    out_g = bb(g, vis)
    out_l = bb(loc)
    torch.testing.assert_close(logits[: 2 * B], st.dino_head(out_g[:, 0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[2 * B:], st.dino_head(out_l[:, 0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pixels, st.decoder(out_g, vis, (8, 6)), rtol=1e-5, atol=1e-5)
    assert pixels.shape == g.shape


def test_joint_loss_terms_and_gradients_reach_every_trainable_part():
    cfg = _small_cfg()
    torch.manual_seed(0)
    st, te = PretrainStudent(cfg), PretrainTeacher(cfg)
    g, loc = torch.randn(4, 3, 64, 48), torch.randn(4, 3, 32, 24)
    vis = random_visible_ids(48, 0.75, torch.arange(4), seed=0, step=0, view=0)
    px, lg, cls = st(g, vis, loc)
    with torch.no_grad():
        tl = te(g)
    out = joint_loss(cfg, g, vis, px, lg, tl, 0.04, 8, student_cls=cls)
    o = cfg.objective
    assert o.koleo_weight > 0
    torch.testing.assert_close(out["loss"], out["loss_mae"] + o.lambda_cl * out["loss_cl"]
                               + o.koleo_weight * out["loss_koleo"])
    # KoLeo: per global view, over that view's batch of [CLS] tokens
    torch.testing.assert_close(out["loss_koleo"], sum(koleo_loss(c) for c in cls[:4].view(2, 2, -1)))
    with pytest.raises(ValueError, match="student_cls"):
        joint_loss(cfg, g, vis, px, lg, tl, 0.04, 8)
    out["loss"].backward()
    for name, p in st.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad is None for p in te.parameters())


def test_tokenizer_masking_does_not_leak_across_masked_windows():
    """With the 4K tokenizer the trunk tokens are windows: masked windows' pixels reach nothing."""
    arch = ArchConfig("t", embed_dims=32, num_layers=2, num_heads=2, mha_early=1, mha_late=1, num_tokenizer_layers=1)
    torch.manual_seed(0)
    m = Sapiens2Backbone(arch, img_size=64, patch_size=4, use_tokenizer=True).eval()  # 16 px windows: 4x4 grid
    x = torch.randn(1, 3, 64, 64)
    vis = torch.tensor([[0, 5, 10, 15]])
    y = m(x, vis)
    x2 = x.clone()
    x2[:, :, 0:16, 16:32] += 5.0  # window 1 (masked)
    torch.testing.assert_close(m(x2, vis), y)
    x3 = x.clone()
    x3[:, :, 16:32, 16:32] += 5.0  # window 5 (visible)
    assert not torch.allclose(m(x3, vis), y)


def test_configs_validate_with_clear_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("7b")
    cfg = tiny()
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown config section"):
        apply_overrides(cfg, ["optimizer.lr=1"])
    with pytest.raises(ValueError, match="optim.lr: expected float"):
        apply_overrides(cfg, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="divisible by the world size"):
        cfg.validate(world_size=3)
    small = apply_overrides(tiny(), ["data.image_size=48,48"])
    with pytest.raises(ValueError, match="smaller than objective.global_size"):
        small.validate()
    odd = apply_overrides(tiny(), ["objective.global_size=60,48"])
    with pytest.raises(ValueError, match="divisible by 8"):
        odd.validate()
    for p in ("tiny", "0.4b", "0.8b", "1b", "1b_4k", "5b"):
        get_preset(p).validate(world_size=8)
