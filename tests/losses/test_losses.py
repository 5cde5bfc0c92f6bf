"""Task losses (sapiens2.losses): equal to the official loss modules on the fixtures, hand-computed
cases, bad-input errors, and gradcheck of our own matting loss.

The fixtures (tests/fixtures/losses_<task>.safetensors) come from scripts/make_loss_fixtures.py run on
the official code: inputs, each term's value and gradient w.r.t. the prediction in float32, and
float64 values (and gradients where small).
"""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from sapiens2.losses import (
    CLASS_WEIGHT_29,
    AlbedoLoss,
    KeypointHeatmapLoss,
    MattingLoss,
    NormalLoss,
    PointmapLoss,
    SegLoss,
    build_loss,
    sobel,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TOL = {torch.float32: 1e-6, torch.float64: 1e-8}  # max-abs error / max-abs reference


def load(task):
    with safe_open(os.path.join(FIXTURES, f"losses_{task}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def case_inputs(fx, meta, case, dtype):
    src = json.loads(meta["shared_inputs"]).get(case, case)
    inp = {k.split(".", 2)[2]: v for k, v in fx.items() if k.startswith(f"{src}.input.")}
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}


def call(task, crit, inp):
    pred = inp["pred"]
    if task == "pose":
        return crit(pred, inp["target"], inp["target_weight"])
    if task == "seg":
        return crit(pred, inp["labels"])
    if task == "pointmap":
        return crit(pred, inp["target"], inp["valid_mask"], pred_scale=inp["pred_scale"], target_scale=inp["target_scale"],
                    intrinsics=inp["intrinsics"], mean_depth=inp.get("mean_depth"))
    return crit(pred, inp["target"], inp.get("valid_mask"))


def close(name, got, ref, tol):
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1e-12)
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


CASES = [
    ("pose", "mse_k308", {}),
    ("pose", "ohkm_k308", {"preset": "paper"}),
    ("pose", "mse_k17", {"num_keypoints": 17}),
    ("pose", "ohkm_k17", {"num_keypoints": 17, "ohem_topk": 8, "loss_weight": 1.0}),
    ("seg", "main", {}),
    ("seg", "degenerate", {}),
    ("normal", "main", {}),
    ("albedo", "main", {}),
    ("pointmap", "main", {}),
    ("pointmap", "clamped", {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("task,case,kw", CASES, ids=[f"{t}-{c}" for t, c, _ in CASES])
def test_matches_official(task, case, kw, dtype):
    fx, meta = load(task)
    tag = "" if dtype == torch.float32 else "64"
    inp = case_inputs(fx, meta, case, dtype)
    leaves = {k: inp[k].requires_grad_() for k in ("pred", "pred_scale") if k in inp}
    out = call(task, build_loss(task, **kw), inp)
    names = sorted(k.split(".", 2)[2] for k in fx if k.startswith(f"{case}.value{tag}."))
    assert sorted(k for k in out if k != "loss") == names
    close(f"{case}.loss", out["loss"].detach(), sum(fx[f"{case}.value{tag}.{n}"] for n in names), TOL[dtype])
    for n in names:
        assert out[n].dtype == dtype
        close(f"{case}.{n}", out[n].detach(), fx[f"{case}.value{tag}.{n}"], TOL[dtype])
        grads = torch.autograd.grad(out[n], list(leaves.values()), retain_graph=True, allow_unused=True)
        for (k, leaf), g in zip(leaves.items(), grads):
            ref = fx.get(f"{case}.grad{tag}.{n}.{k}")
            if ref is not None:
                close(f"{case}.{n} d/d{k}", torch.zeros_like(leaf) if g is None else g, ref, TOL[dtype])


def test_default_masks_and_mean_depth_match_official():
    # normal fixture: invalid pixels carry -200, so the default mask (target[:, 0] > -100) is the passed one
    fx, meta = load("normal")
    inp = case_inputs(fx, meta, "main", torch.float32)
    out = NormalLoss()(inp["pred"], inp["target"])
    for n in ("loss_cosine_sim", "loss_l1", "loss_grad_l1"):
        close(n, out[n], fx[f"main.value.{n}"], TOL[torch.float32])
    # pointmap: mean_depth defaults to the mean target Z over valid pixels, as the data pipeline does
    fx, meta = load("pointmap")
    inp = case_inputs(fx, meta, "main", torch.float32)
    inp.pop("mean_depth")
    out = call("pointmap", PointmapLoss(), inp)
    for n in ("loss_l1", "loss_multiscale_l1_2", "loss_shift_invariant"):
        close(n, out[n], fx[f"main.value.{n}"], 1e-6)


def test_defaults_are_the_config_arguments():
    """build_loss defaults == the loss_decode arguments of the official configs stored in the fixtures."""
    cfg = {t: json.loads(load(t)[1]["kwargs"]) for t in ("pose", "seg", "normal", "albedo", "pointmap")}
    assert load("seg")[1]["mirror_commit"] and load("seg")[1]["official_sha256"]
    (mse,) = cfg["pose"]["mse_k308"]
    pose = build_loss("pose")
    assert (mse["type"], mse["loss_weight"], mse["use_target_weight"]) == ("KeypointMSELoss", pose.loss_weight, pose.use_target_weight)
    assert pose.ohem_topk is None and pose.num_keypoints == 308
    (ohkm,) = cfg["pose"]["ohkm_k308"]
    paper = build_loss("pose", preset="paper")
    assert (ohkm["topk"], 1.0) == (paper.ohem_topk, paper.loss_weight)
    ce, dice = cfg["seg"]["main"]
    seg = build_loss("seg")
    assert tuple(ce["class_weight"]) == CLASS_WEIGHT_29 == tuple(seg.class_weight.tolist())
    assert (ce["ignore_index"], dice["ignore_index"], dice["include_background"]) == (seg.ignore_index, 255, seg.include_background)
    assert (ce["loss_weight"], dice["loss_weight"]) == (seg.ce_weight, seg.dice_weight)
    w = lambda t: {e["type"]: e["loss_weight"] for e in cfg[t]["main"]}  # noqa: E731
    n = build_loss("normal")
    assert w("normal") == {"NormalCosineSimilarityLoss": n.cosine_weight, "L1Loss": n.pixel_weight, "NormalGradL1Loss": n.grad_weight}
    a = build_loss("albedo")
    assert w("albedo") == {"L1Loss": a.pixel_weight, "AlbedoGradL1Loss": a.grad_weight, "AlbedoChromaticityL1Loss": a.chroma_weight}
    assert a.mean_weight == 0
    p = build_loss("pointmap")
    assert w("pointmap") == {
        "L1Loss": p.l1_weight, "MultiscaleL1Loss": p.multiscale_weight, "SiLogLoss": p.silog_weight,
        "PointmapIntrinsicsConsistencyLoss": p.k_consistency_weight, "PointmapShiftInvariantL1Loss": p.shift_invariant_weight,
        "PointmapNormalLoss": p.normal_weight, "PointmapScaleL1Loss": p.scale_weight,
    }  # fmt: skip
    assert [e.get("scale_factor") for e in cfg["pointmap"]["main"] if e["type"] == "MultiscaleL1Loss"] == [p.multiscale_factor]


# ----------------------------------------------------------------------------------------------
# hand-computed cases (numbers worked out by hand, not through the implementation)


def approx(x, v, tol=1e-6):
    assert abs(float(x) - v) <= tol * max(1.0, abs(v)), f"{float(x)} != {v}"


def test_pose_hand():
    pred = torch.tensor([[[[1.0, 2.0]], [[3.0, 3.0]]]])  # (1, 2, 1, 2), target 0
    out = KeypointHeatmapLoss(num_keypoints=2)(pred, torch.zeros_like(pred), torch.tensor([[1.0, 0.0]]))
    approx(out["loss_kpt"], 10 * (1 + 4 + 0 + 0) / 4)  # mean over all 4 elements, kpt 1 weighted 0
    pred = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])
    w = torch.tensor([[[1.0, 0.5]]])  # (B, 1, K) as the pipeline packs it
    # per-keypoint: mean(1, 9) = 5 and 0.5^2 * mean(4, 4) = 1
    approx(KeypointHeatmapLoss(num_keypoints=2, ohem_topk=1, loss_weight=1)(pred, torch.zeros_like(pred), w)["loss"], 5.0)
    approx(KeypointHeatmapLoss(num_keypoints=2, ohem_topk=2, loss_weight=1)(pred, torch.zeros_like(pred), w)["loss"], 3.0)
    # skip_empty_channel: keypoint 1's target is all zero, so it drops out
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    out = KeypointHeatmapLoss(num_keypoints=2, loss_weight=1, skip_empty_channel=True)(pred, t)
    approx(out["loss"], (0 + 9) / 4)


def test_seg_hand():
    logits = torch.zeros(2, 3, 1, 2)  # p = 1/3 everywhere
    labels = torch.tensor([[[1, 255]], [[0, 0]]])
    out = SegLoss(num_classes=3, class_weight=[1.0, 2.0, 3.0])(logits, labels)
    # CE: 2 ln3 (sample 0, pixel 0) + 2 x 1 x ln3 (sample 1); ignored pixel counted in the 4 pixels
    approx(out["loss_ce"], (2 * math.log(3) + 2 * math.log(3)) / 4)
    # Dice, sample 0: class 1 present at its one valid pixel; sample 1: background only -> 0, still in B
    d1 = (2 / 3 + 1e-3) / (1 / 9 + 1 + 1e-3)
    approx(out["loss_dice"], (1 - d1) / 2)
    approx(out["loss"], math.log(3) + (1 - d1) / 2)
    naive = SegLoss(num_classes=3, class_weight=None, naive_dice=True)(logits, labels)
    approx(naive["loss_ce"], 3 * math.log(3) / 4)
    approx(naive["loss_dice"], (1 - (2 / 3 + 1e-3) / (1 / 3 + 1 + 1e-3)) / 2)  # sum P, sum G not squared


def test_normal_hand():
    pred = torch.tensor([[1.0, 0, 0], [0, 2, 0]]).t().reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 1, 0], [0, 1, 0]]).t().reshape(1, 3, 1, 2)
    out = NormalLoss()(pred, target, torch.ones(1, 1, 1, 2))
    approx(out["loss_cosine_sim"], 10 * (1 + 0) / 2)
    approx(out["loss_l1"], 1 * (2 + 1) / 2)  # channels summed, divided by pixels
    approx(out["loss_grad_l1"], 10 * (1 + 4 + 0))  # d = pred - target; dx = (-1, 2, 0); no y pairs
    approx(out["loss"], 5 + 1.5 + 50)
    approx(NormalLoss(pixel="l2")(pred, target)["loss_l2"], (2 + 1) / 2)


def test_albedo_hand():
    pred = torch.tensor([[0.5, 0.5, 0.5], [1.5, 0, 0.5]]).t().reshape(1, 3, 1, 2)
    target = torch.tensor([[0.25, 0.25, 0.5], [1, 0, 0]]).t().reshape(1, 3, 1, 2)
    out = AlbedoLoss()(pred, target, torch.ones(1, 1, 1, 2, dtype=torch.bool))
    approx(out["loss_l1"], 2 * (0.5 + 1.0) / 2)
    approx(out["loss_grad_l1"], 2 * 0.5 * (0.0625 + 0.0625 + 0.25))
    # chroma: pred clamped to (1, 0, .5) -> (2/3, 0, 1/3); target (1/4, 1/4, 1/2) and (1, 0, 0)
    approx(out["loss_chroma_l1"], (1 / 3 + 2 / 3) / 2, 1e-5)
    paper = build_loss("albedo", preset="paper")(pred, target)
    assert set(paper) == {"loss_l2", "loss_grad_l1", "loss_mean", "loss"}
    approx(paper["loss_l2"], 2 * ((0.0625 * 2) + (0.25 + 0.25)) / 2)
    approx(paper["loss_mean"], (1 - 0.625) ** 2 + (0.25 - 0.125) ** 2 + (0.5 - 0.25) ** 2)


def only(term, **kw):
    w = dict(l1_weight=0, multiscale_weight=0, silog_weight=0, k_consistency_weight=0, shift_invariant_weight=0, normal_weight=0, scale_weight=0)
    w.update(kw)
    w[term] = kw.get(term, 1.0)
    return PointmapLoss(**w)


def test_pointmap_hand():
    ones = torch.ones(1, 1, 1, 2)
    target = torch.tensor([[0.0, 0, 2], [2, 0, 2]]).t().reshape(1, 3, 1, 2)  # Z = 2 -> mean depth 2
    pred = target + torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)  # constant X offset 1
    approx(only("l1_weight", l1_weight=2.0)(pred, target, ones)["loss_l1"], 2 * 0.5)
    approx(only("multiscale_weight")(pred, target, ones)["loss_multiscale_l1_2"], 0.5)
    approx(only("shift_invariant_weight")(pred, target, ones)["loss_shift_invariant"], 0.0)  # offset removed
    approx(only("l1_weight", l1_weight=20.0)(pred, target, ones)["loss_l1"], 4.0)  # clamped at 4
    # K consistency, fx = fy = 1, c = 0: x = u Z = (0, 2), y = 0; pred X = (1, 2), Y = (0, 1)
    K = torch.eye(3)[None]
    p = torch.tensor([[1.0, 0, 2], [2, 1, 2]]).t().reshape(1, 3, 1, 2)
    approx(only("k_consistency_weight")(p, target, ones, intrinsics=K)["loss_K_consistency"], (1 + 1) / 2)
    # SiLog: d = log Tz - log Pz = (1, 2): sqrt(E d^2 - E[d]^2 / 2) = sqrt(2.5 - 1.125)
    t = torch.ones(1, 3, 1, 2)
    p = torch.tensor([1, 1, math.exp(-1), 1, 1, math.exp(-2)]).view(1, 2, 3).permute(0, 2, 1).reshape(1, 3, 1, 2)
    approx(only("silog_weight")(p, t, ones)["loss_silog"], math.sqrt(1.375))
    approx(only("scale_weight", scale_weight=4.0)(pred, target, ones, pred_scale=torch.tensor([[1.5]]), target_scale=torch.tensor([1.0]))["loss_scale_l1"], 2.0)
    # normals on a 2x2 grid: target plane Z = 1 (normal +-z), pred plane Z = 1 + u (normal (-+1, 0, +-1)/sqrt2)
    u = torch.tensor([[0.0, 1], [0, 1]])
    v = torch.tensor([[0.0, 0], [1, 1]])
    tgt = torch.stack([u, v, torch.ones(2, 2)])[None]
    prd = torch.stack([u, v, 1 + u])[None]
    e = (1 - 1 / math.sqrt(2)) + 1 / 3  # cos = 1/sqrt2; mean_c |nP - nT| = (1/sqrt2 + 1 - 1/sqrt2) / 3
    out = only("normal_weight", normal_weight=2.0)(prd, tgt, torch.ones(1, 1, 2, 2), target_scale=torch.tensor([1.0]))
    approx(out["loss_normal"], 2 * e)


def test_matting_hand():
    pred = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2), target 0
    target = torch.zeros_like(pred)
    fg, bg = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    out = MattingLoss()(pred, target, image=torch.zeros(1, 3, 1, 2), fg=fg, bg=bg)
    approx(out["loss_alpha"], 0.5)
    # replicate-padded rows are all (1, 1, 0, 0): Sx = -(1 + 2 + 1) at both pixels, Sy = 0
    approx(out["loss_grad"], (4 + 4) / 2)
    approx(out["loss_comp"], 3 * 1 / (3 * 2))
    approx(out["loss"], 5.0)
    assert set(MattingLoss()(pred, target)) == {"loss_alpha", "loss_grad", "loss"}
    assert sobel(torch.full((1, 1, 3, 3), 0.5)).abs().max() == 0  # flat alpha: no edges, borders included


# ----------------------------------------------------------------------------------------------
# masks, NaN targets, precision


def test_masked_nan_targets_are_ignored():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    m = torch.rand(2, 1, 5, 4, generator=g) > 0.3
    bad = torch.where(m, target, float("nan"))
    for crit in (NormalLoss(), AlbedoLoss()):
        a, b = crit(pred, target, m)["loss"], crit(pred, bad, m)["loss"]
        assert torch.isfinite(b) and torch.allclose(a, b, rtol=1e-6, atol=0)
    # pointmap: the multiscale (bilinear) and normal (neighbour differences) terms read masked target
    # values too, as the official does; a masked NaN reads as 0 there
    tz = torch.where(m, target.abs() + 1, 0)
    bad = torch.where(m, tz, float("nan"))
    kw = dict(intrinsics=torch.eye(3).expand(2, 3, 3), pred_scale=torch.ones(2), target_scale=torch.ones(2))
    a, b = PointmapLoss()(pred, tz, m, **kw)["loss"], PointmapLoss()(pred, bad, m, **kw)["loss"]
    assert torch.isfinite(b) and torch.allclose(a, b, rtol=1e-6, atol=0)
    # pose: NaN heatmaps of zero-weight keypoints
    hp, ht = torch.randn(2, 4, 3, 3, generator=g), torch.rand(2, 4, 3, 3, generator=g)
    w = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]])
    ht_bad = torch.where(w[:, :, None, None] == 0, float("nan"), ht)
    for crit in (KeypointHeatmapLoss(num_keypoints=4), KeypointHeatmapLoss(num_keypoints=4, ohem_topk=2)):
        assert torch.allclose(crit(hp, ht, w)["loss"], crit(hp, ht_bad, w)["loss"], rtol=1e-6, atol=0)


def test_silog_empty_sample_has_zero_gradient():
    pred = (torch.rand(2, 3, 4, 4) + 1).requires_grad_()
    m = torch.ones(2, 1, 4, 4)
    m[1] = 0  # sample 1 has no valid pixel: official sqrt(0) backward is NaN
    out = only("silog_weight")(pred, torch.rand(2, 3, 4, 4) + 1, m)["loss"]
    (g,) = torch.autograd.grad(out, pred)
    assert torch.isfinite(g).all() and g[1].abs().max() == 0 and g[0].abs().max() > 0


def test_low_precision_inputs_compute_in_float32():
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ref = NormalLoss()(pred.bfloat16().float(), target.bfloat16().float())["loss"]
    out = NormalLoss()(pred.bfloat16(), target.bfloat16())["loss"]
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 4, 4)
    for crit in (NormalLoss(), AlbedoLoss(), PointmapLoss()):
        with pytest.raises(ValueError, match="pred .* and target .* same shape"):
            crit(x, torch.randn(2, 3, 4, 5))
        with pytest.raises(ValueError, match="3 channels"):
            crit(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))
        with pytest.raises(ValueError, match="target has NaN"):
            crit(x, torch.where(x > 1, float("nan"), x.abs() + 1), torch.ones(2, 1, 4, 4))
        with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
            crit(x.numpy(), x)
        with pytest.raises(ValueError, match="valid_mask must be binary"):
            crit(x, x, torch.full((2, 1, 4, 4), 0.5))
        with pytest.raises(ValueError, match="valid_mask must have shape"):
            crit(x, x, torch.ones(2, 1, 4, 3))
    with pytest.raises(ValueError, match="intrinsics"):
        PointmapLoss()(x, x.abs() + 1, target_scale=torch.ones(2), pred_scale=torch.ones(2))
    with pytest.raises(ValueError, match="pred_scale"):
        PointmapLoss(k_consistency_weight=0)(x, x.abs() + 1, target_scale=torch.ones(2))
    with pytest.raises(ValueError, match="target_scale must be positive"):
        PointmapLoss(k_consistency_weight=0)(x, x.abs() + 1, pred_scale=torch.ones(2), target_scale=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="pred_scale must have shape"):
        PointmapLoss(k_consistency_weight=0)(x, x.abs() + 1, pred_scale=torch.ones(2, 2), target_scale=torch.ones(2))

    seg = SegLoss()
    logits = torch.randn(2, 29, 4, 4)
    labels = torch.randint(0, 29, (2, 4, 4))
    seg(logits, torch.where(labels > 20, 255, labels))  # the ignore label is fine
    for bad in (29, -1, 254):
        with pytest.raises(ValueError, match=f"class id {bad} outside"):
            seg(logits, torch.where(labels > 20, bad, labels))
    with pytest.raises(TypeError, match="labels must be an integer"):
        seg(logits, labels.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        seg(logits, labels[:, :3])
    with pytest.raises(ValueError, match="num_classes=29"):
        seg(logits[:, :5], labels % 5)
    with pytest.raises(ValueError, match="class_weight has 29 entries"):
        SegLoss(num_classes=5)

    hm = torch.rand(2, 17, 8, 6)
    with pytest.raises(ValueError, match="17 heatmaps .* num_keypoints=308"):
        KeypointHeatmapLoss()(hm, hm, torch.ones(2, 17))
    with pytest.raises(ValueError, match="pred .* and target .* same shape"):
        KeypointHeatmapLoss(num_keypoints=17)(hm, hm[:, :, :7])
    with pytest.raises(ValueError, match="target_weight must have shape"):
        KeypointHeatmapLoss(num_keypoints=17)(hm, hm, torch.ones(2, 16))
    with pytest.raises(ValueError, match="ohem_topk .* must not exceed"):
        KeypointHeatmapLoss(num_keypoints=None, ohem_topk=18)(hm, hm, torch.ones(2, 17))
    with pytest.raises(ValueError, match="target has NaN"):
        KeypointHeatmapLoss(num_keypoints=17)(hm, torch.where(hm > 0.9, float("nan"), hm), torch.ones(2, 17))

    a = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="missing fg, bg"):
        MattingLoss()(a, a, image=torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="target alpha must lie in"):
        MattingLoss()(a, a + 1)
    with pytest.raises(ValueError, match="1 channel"):
        MattingLoss()(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="fg must have shape"):
        MattingLoss()(a, a, image=torch.rand(1, 3, 4, 4), fg=torch.rand(1, 3, 4, 3), bg=torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="unknown task"):
        build_loss("depth")
    with pytest.raises(ValueError, match="weight 0"):
        NormalLoss(cosine_weight=0, pixel_weight=0, grad_weight=0)(x, x)


def test_presets_and_scale_shapes():
    assert set(build_loss("normal", preset="paper")(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))) == {
        "loss_cosine_sim", "loss_l2", "loss_grad_l1", "loss"}  # fmt: skip
    assert build_loss("keypoints308").num_keypoints == 308 and build_loss("seg", preset="paper").dice_weight == 1.0
    x = torch.rand(2, 3, 4, 4) + 1
    crit = PointmapLoss(k_consistency_weight=0)
    ref = crit(x * 1.1, x, pred_scale=torch.tensor([1.0, 2.0]), target_scale=torch.tensor([1.5, 1.0]))["loss"]
    for shape in ((2, 1), (2, 1, 1, 1)):
        out = crit(x * 1.1, x, pred_scale=torch.tensor([1.0, 2.0]).view(shape), target_scale=torch.tensor([1.5, 1.0]).view(shape))
        assert torch.equal(out["loss"], ref)


# ----------------------------------------------------------------------------------------------
# our own loss: gradcheck in float64


def test_matting_gradcheck():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.rand(2, 1, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 4, 3, generator=g) > 0.2
    img, fg, bg = (torch.rand(2, 3, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    crit = MattingLoss(alpha_weight=1.0, grad_weight=0.5, comp_weight=2.0)
    assert torch.autograd.gradcheck(lambda p: crit(p, target, mask, image=img, fg=fg, bg=bg)["loss"], (pred,))
    for term in ("loss_alpha", "loss_grad", "loss_comp"):
        assert torch.autograd.gradcheck(lambda p: crit(p, target, image=img, fg=fg, bg=bg)[term], (pred,))
