"""The evaluation metrics (sapiens2.metrics) on constructed cases with known answers.

Keypoint AP runs through the COCO API: each backend that imports here (xtcocotools, pycocotools) is tested,
and the two are checked against each other and against our own OKS formula."""

import importlib
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from sapiens2.extras import MissingExtra
from sapiens2.metrics import keypoints as kp_mod
from sapiens2.metrics import (FLIP_INDICES, FLIP_PAIRS, KEYPOINT_NAMES, PARTS, SIGMAS, SKELETON, AlbedoMetric,
                              KeypointAP, MattingMetric, NormalMetric, PointmapMetric, SegmentationMetric,
                              albedo_metrics, confusion_matrix, keypoint_ap, matting_metrics, normal_metrics,
                              oks_matrix, oks_nms, pointmap_metrics, psnr_from_mse, segmentation_metrics)
from sapiens2.metrics.keypoints308 import NAME_TO_INDEX, mirror_name
from sapiens2.metrics.matting import _gauss_derivative_kernels

# where xtcocotools is installed from its numpy-1 wheel, "auto" falls back to pycocotools with a warning
pytestmark = pytest.mark.filterwarnings("ignore:xtcocotools does not load:RuntimeWarning")

K = 308
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _loads(name):
    try:
        importlib.import_module(f"{name}.cocoeval")
        return True
    except (ImportError, ValueError):  # xtcocotools' numpy-1 wheels fail with ValueError under numpy 2
        return False


BACKENDS = [b for b in ("xtcocotools", "pycocotools") if _loads(b)]
needs_backend = pytest.mark.skipif(not BACKENDS, reason="neither xtcocotools nor pycocotools loads")
backend_param = pytest.mark.parametrize("backend", BACKENDS or ["none"])


def _person(rng, cx, cy, spread=80.0):
    xy = np.stack([cx + rng.uniform(-spread, spread, K), cy + rng.uniform(-2 * spread, 2 * spread, K)], axis=1)
    return np.concatenate([xy, np.full((K, 1), 2.0)], axis=1)


def _as_pred(gt_kpts, score=1.0):
    return np.concatenate([gt_kpts[..., :2], np.full(gt_kpts.shape[:-1] + (1,), score)], axis=-1)


# ------------------------------------------------------------------------------------------ 308 metadata
def test_keypoint_metadata_facts():
    assert len(KEYPOINT_NAMES) == K == len(set(KEYPOINT_NAMES)) == SIGMAS.shape[0]
    assert KEYPOINT_NAMES[:3] == ("nose", "left_eye", "right_eye")
    # sigmas carried over from the official metadata: COCO-WholeBody's where shared, set by hand, 0.010 default
    s = dict(zip(KEYPOINT_NAMES, SIGMAS.tolist()))
    assert s["nose"] == 0.026 and s["left_hip"] == 0.107 and s["left_shoulder"] == 0.079
    assert s["neck"] == 0.079 and s["left_olecranon"] == 0.072 and s["right_thumb_third_joint"] == 0.022
    assert all(SIGMAS[i] == 0.01 for i in PARTS["face"])
    assert {p: len(v) for p, v in PARTS.items()} == {"body": 17, "foot": 6, "face": 238, "left_hand": 20,
                                                      "right_hand": 20, "extra": 7}
    assert sorted(i for v in PARTS.values() for i in v) == list(range(K))
    assert len(SKELETON) == 65 and all(0 <= a < K and 0 <= b < K and a != b for a, b in SKELETON)
    with pytest.raises(ValueError):
        SIGMAS[0] = 1.0  # read-only


def test_flip_pairs():
    assert len(FLIP_PAIRS) == 146
    flip = np.array(FLIP_INDICES)
    assert (flip[flip] == np.arange(K)).all()  # an involution
    assert (flip == np.arange(K)).sum() == 16  # midline keypoints
    n = NAME_TO_INDEX
    assert FLIP_INDICES[n["left_wrist"]] == n["right_wrist"]
    assert FLIP_INDICES[n["upper_startpoint_of_r_eyebrow"]] == n["upper_startpoint_of_l_eyebrow"]
    # the name rule holds except on 120 face keypoints numbered the other way round on the two sides
    wrong = [name for i, name in enumerate(KEYPOINT_NAMES) if mirror_name(name) != KEYPOINT_NAMES[flip[i]]]
    assert len(wrong) == 120 and all(n[w] in PARTS["face"] for w in wrong)
    assert FLIP_INDICES[n["l_midpoint_2_of_upper_lash_line"]] == n["r_midpoint_1_of_upper_lash_line"]
    assert FLIP_INDICES[n["midpoint_1_of_upper_outer_lip"]] == n["midpoint_2_of_upper_outer_lip"]
    # mirrored sigmas are equal, except on the feet, whose sigmas the official metadata copies from
    # COCO-WholeBody, where left (0.068, 0.066, 0.066) and right (0.092, 0.094, 0.094) differ
    differ = np.nonzero(SIGMAS != SIGMAS[flip])[0]
    assert sorted(differ.tolist()) == sorted(PARTS["foot"])


# -------------------------------------------------------------------------------------------- keypoint AP
@needs_backend
@backend_param
def test_perfect_prediction_ap_is_one(backend):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for i in range(3):
        g = np.stack([_person(rng, 200, 300), _person(rng, 700, 300)])
        gts.append({"keypoints": g, "areas": np.array([60000.0, 50000.0])})
        preds.append({"keypoints": _as_pred(g), "scores": np.array([0.9, 0.8])})
    r = keypoint_ap(preds, gts, backend=backend, parts=True)
    assert r["backend"].startswith(backend) and r["num_images"] == 3
    for key in ("AP", "AP50", "AP75", "AP_L", "AR", "AR50", "AR75", "AR_L", "body/AP", "face/AP", "left_hand/AR"):
        assert r[key] == pytest.approx(1.0), key
    assert r["AP_M"] == -1.0  # no ground truth of medium area: COCO's "undefined"


def _offset_case(d):
    rng = np.random.default_rng(1)
    g = _person(rng, 300, 300)[None]
    g[0, ::7, 2] = 0  # some keypoints not labelled: they do not count
    area = 50000.0
    p = g.copy()
    p[0, :, 0] += d
    p[0, :, 2] = 1.0
    lab = g[0, :, 2] > 0
    # OKS by hand: mean over labelled keypoints of exp(-d^2 / (2 A (2 sigma)^2))
    oks = float(np.mean(np.exp(-d ** 2 / (2 * area * (2 * SIGMAS[lab]) ** 2))))
    return p, g, area, oks


@needs_backend
@backend_param
@pytest.mark.parametrize("d", [1.0, 2.5, 4.0, 5.0, 8.0])  # OKS 0.98, 0.88, 0.73, 0.63, 0.35
def test_known_oks_gives_ap_at_thresholds(backend, d):
    p, g, area, oks = _offset_case(d)
    assert np.min(np.abs(OKS_THRESHOLDS - oks)) > 0.005, "offset too close to a threshold"
    assert oks_matrix(p, g, [area])[0, 0] == pytest.approx(oks, rel=1e-12)
    r = keypoint_ap([{"keypoints": p}], [{"keypoints": g, "areas": [area]}], backend=backend)
    matched = OKS_THRESHOLDS <= oks  # one person: AP is 1 at each threshold it passes, 0 at the others
    assert r["AP"] == pytest.approx(matched.mean())
    assert r["AR"] == pytest.approx(matched.mean())
    assert r["AP50"] == pytest.approx(float(oks >= 0.5))
    assert r["AP75"] == pytest.approx(float(oks >= 0.75))


def _coco_ious(backend, gts, dets, use_area=True):
    """Run the backend's COCOeval on one image and return its computeOks matrix (dets sorted by score)."""
    be = kp_mod.load_coco_backend(backend)
    anns = [{"id": j + 1, "image_id": 1, "category_id": 1, "keypoints": g["kp"].reshape(-1).tolist(),
             "num_keypoints": int((g["kp"][:, 2] > 0).sum()), "bbox": list(g["box"]), "area": g["area"],
             "iscrowd": 0} for j, g in enumerate(gts)]
    res = [{"image_id": 1, "category_id": 1, "keypoints": d.reshape(-1).tolist(), "score": s} for d, s in dets]
    gt = be.COCO()
    gt.dataset = {"images": [{"id": 1}], "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    gt.createIndex()
    dt = gt.loadRes(res)
    if be.name == "xtcocotools":
        ev = be.COCOeval(gt, dt, "keypoints", SIGMAS, use_area=use_area)
    else:
        ev = be.COCOeval(gt, dt, "keypoints")
        ev.params.kpt_oks_sigmas = SIGMAS
    ev.evaluate()
    return np.asarray(ev.ious[(1, 1)])


@needs_backend
@backend_param
def test_oks_matrix_equals_cocoeval_computeoks(backend, capsys):
    rng = np.random.default_rng(2)
    g1, g2 = _person(rng, 200, 300), _person(rng, 500, 320)
    g2[rng.random(K) < 0.3, 2] = 0
    g3 = _person(rng, 800, 300)
    g3[:, 2] = 0  # nothing labelled: OKS from the distance to the doubled box
    gts = [{"kp": g1, "box": (120.0, 140.0, 160.0, 320.0), "area": 40000.0},
           {"kp": g2, "box": (420.0, 160.0, 160.0, 320.0), "area": 35000.0},
           {"kp": g3, "box": (760.0, 250.0, 80.0, 100.0), "area": 8000.0}]
    dets = [(_as_pred(g1 + rng.normal(0, 3, g1.shape)), 0.9), (_as_pred(g2 + rng.normal(0, 8, g2.shape)), 0.7),
            (_as_pred(g3 + rng.normal(0, 30, g3.shape)), 0.5), (_as_pred(g1 + 40.0), 0.3)]
    use_areas = [True, False] if backend == "xtcocotools" else [True]
    for use_area in use_areas:
        ours = oks_matrix(np.stack([d for d, _ in dets]), np.stack([g["kp"] for g in gts]),
                          [g["area"] for g in gts], gt_boxes=[g["box"] for g in gts], use_area=use_area)
        theirs = _coco_ious(backend, gts, dets, use_area)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
        assert 0.0 < ours.min() and ours.max() <= 1.0


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both xtcocotools and pycocotools")
def test_backends_agree_on_a_mixed_case():
    rng = np.random.default_rng(3)
    gts, preds = [], []
    for i in range(4):
        g = np.stack([_person(rng, 150 + 300 * j, 300, spread=20 + 40 * j) for j in range(3)])
        g[1, rng.random(K) < 0.5, 2] = 0
        p = _as_pred(g + rng.normal(0, 2 + 3 * i, g.shape), score=0.8)
        p[:, :, 2] = rng.uniform(0.0, 1.0, (3, K))
        p = np.concatenate([p, _as_pred(_person(rng, 400, 600))[None]])  # a false positive
        gts.append({"keypoints": g, "boxes": np.array([[100 + 300 * j, 100, 100, 400] for j in range(3)], float)})
        preds.append({"keypoints": p[:2] if i == 1 else p, "scores": rng.uniform(0.5, 1.0, 2 if i == 1 else 4)})
    rx = keypoint_ap(preds, gts, backend="xtcocotools", parts=True)
    rp = keypoint_ap(preds, gts, backend="pycocotools", parts=True)
    assert 0.0 < rx["AP"] < 1.0
    for key, v in rx.items():
        if key != "backend":
            assert rp[key] == pytest.approx(v, abs=1e-12), key


@needs_backend
def test_accumulator_equals_one_shot_and_handles_empty_images():
    rng = np.random.default_rng(4)
    gts = [{"keypoints": _person(rng, 300, 300)[None], "areas": [30000.0]} for _ in range(3)]
    preds = [{"keypoints": _as_pred(g["keypoints"] + rng.normal(0, 4, (1, K, 3)))} for g in gts]
    preds[2] = {"keypoints": np.zeros((0, K, 3))}  # a missed person
    m = KeypointAP()
    m.update(preds[0], gts[0])
    m.update(preds[1:], gts[1:])
    a, b = m.compute(), keypoint_ap(preds, gts)
    assert a == b and a["num_images"] == 3
    m1, m2 = KeypointAP(), KeypointAP()
    m1.update(preds[:2], gts[:2])
    m2.update(preds[2:], gts[2:])
    m1.merge(m2)
    assert m1.compute() == a
    assert a["AR"] <= 2 / 3 + 1e-12
    # no prediction at all: AP 0, and no crash in pycocotools' loadRes
    assert keypoint_ap([{"keypoints": np.zeros((0, K, 3))}], gts[:1])["AP"] == 0.0


@needs_backend
def test_rescoring_nms_and_zero_score_persons():
    rng = np.random.default_rng(5)
    g = _person(rng, 300, 300)[None]
    gt = [{"keypoints": g, "areas": [30000.0]}]
    zero = _as_pred(g, score=0.0)
    # every keypoint score 0: dropped (as xtcocotools does), with either backend
    for backend in BACKENDS:
        assert keypoint_ap([{"keypoints": zero}], gt, backend=backend, rescore=False)["AP"] == 0.0
    # rescoring: box score x mean keypoint score above 0.2
    k = _as_pred(g)[0]
    k[:, 2] = np.where(np.arange(K) % 2 == 0, 0.8, 0.1)
    m = KeypointAP()
    (kp, score), = m._prepare(k[None], np.array([0.5]))
    assert score == pytest.approx(0.5 * 0.8)
    # OKS-NMS: a near-duplicate is dropped, a distant person kept
    a = _as_pred(g)[0]
    far = a.copy()
    far[:, 0] += 1000
    keep = oks_nms(np.stack([a, a + 0.5, far]), np.array([0.9, 0.95, 0.5]))
    assert keep.tolist() == [1, 2]
    assert oks_nms(np.stack([a, a + 0.5]), np.array([0.9, 0.95]), thr=1.0).tolist() == [1, 0]


@needs_backend
def test_keypoint_bad_inputs():
    rng = np.random.default_rng(6)
    g = {"keypoints": _person(rng, 300, 300)[None], "areas": [30000.0]}
    ok = {"keypoints": _as_pred(g["keypoints"])}
    with pytest.raises(ValueError, match="expected 308"):
        keypoint_ap([{"keypoints": np.zeros((1, 17, 3))}], [g])
    with pytest.raises(ValueError, match="expected 308"):
        keypoint_ap([ok], [{"keypoints": np.zeros((1, 133, 3))}])
    bad = _as_pred(g["keypoints"])
    bad[0, 5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        keypoint_ap([{"keypoints": bad}], [g])
    with pytest.raises(ValueError, match="prediction images"):
        keypoint_ap([ok, ok], [g])
    with pytest.raises(TypeError):
        keypoint_ap(["not a dict"], [g])
    with pytest.raises(ValueError, match="scores"):
        keypoint_ap([{"keypoints": ok["keypoints"], "scores": [0.5, 0.4]}], [g])
    with pytest.raises(ValueError, match="keypoint_scores"):
        keypoint_ap([{"keypoints": ok["keypoints"][..., :2]}], [g])
    with pytest.raises(ValueError, match="x, y, w, h"):
        keypoint_ap([ok], [{**g, "boxes": [[10, 10, -5, 20]]}])
    with pytest.raises(ValueError, match="backend"):
        keypoint_ap([ok], [g], backend="cocoapi")
    # (N, K, 2) with separate scores and torch tensors are accepted
    r = keypoint_ap([{"keypoints": torch.from_numpy(ok["keypoints"][..., :2]),
                      "keypoint_scores": torch.ones(1, K)}], [g])
    assert r["AP"] == pytest.approx(1.0)


def test_keypoint_ap_without_coco_packages_names_the_extra(monkeypatch):
    for name in ("xtcocotools", "xtcocotools.coco", "xtcocotools.cocoeval", "pycocotools", "pycocotools.coco",
                 "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(MissingExtra, match=r"pip install 'sapiens2\[eval\]'"):
        KeypointAP()
    with pytest.raises(MissingExtra, match=r"sapiens2\[eval\]"):
        kp_mod.load_coco_backend("xtcocotools")


@pytest.mark.skipif("pycocotools" not in BACKENDS, reason="needs pycocotools")
def test_broken_xtcocotools_falls_back_with_a_warning(monkeypatch):
    def broken():
        raise ValueError("numpy.dtype size changed, may indicate binary incompatibility")

    monkeypatch.setattr(kp_mod, "_xtcocotools", broken)
    with pytest.warns(RuntimeWarning, match="falls back to pycocotools"):
        assert kp_mod.load_coco_backend().name == "pycocotools"
    with pytest.raises(ImportError, match="no-binary"):
        kp_mod.load_coco_backend("xtcocotools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="use_area=False"):
            KeypointAP(use_area=False)


# ------------------------------------------------------------------------------------------- segmentation
def test_segmentation_known_iou():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 0, 1, 1],
                           [2, 2, 255, 255],
                           [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 0, 1, 1],
                         [2, 0, 4, 4],
                         [2, 2, 0, 1]])
    # class 0: TP 3, FN 1 (->1), FP 1 (from a 2)  -> 3/5 ; class 1: TP 4, FP 1 -> 4/5 ; class 2: TP 3, FN 1 -> 3/4
    # class 3: in neither -> NaN, left out of the mean ; class 4: predicted only on ignored pixels -> NaN too
    r = segmentation_metrics(pred, target, num_classes=5)
    np.testing.assert_allclose(r["IoU"][:3], [3 / 5, 4 / 5, 3 / 4])
    assert np.isnan(r["IoU"][3]) and np.isnan(r["IoU"][4])
    assert r["mIoU"] == pytest.approx((3 / 5 + 4 / 5 + 3 / 4) / 3)
    assert r["aAcc"] == pytest.approx(10 / 12)
    np.testing.assert_allclose(r["Acc"][:3], [3 / 4, 4 / 4, 3 / 4])
    # a class predicted on counted pixels but absent from the targets has IoU 0 and does count
    pred2 = pred.clone()
    pred2[0, 0] = 3
    r2 = segmentation_metrics(pred2, target, num_classes=5)
    assert r2["IoU"][3] == 0.0 and r2["mIoU"] == pytest.approx((2 / 5 + 4 / 5 + 3 / 4 + 0) / 4)
    # valid mask removes pixels like ignore_index does
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[0, 1] = False
    r3 = segmentation_metrics(pred, target, num_classes=5, valid=valid)
    assert r3["IoU"][0] == pytest.approx(3 / 4) and r3["IoU"][1] == pytest.approx(1.0)


def test_segmentation_logits_accumulation_and_errors():
    rng = np.random.default_rng(7)
    target = torch.from_numpy(rng.integers(0, 4, (2, 8, 8)))
    logits = torch.from_numpy(rng.normal(size=(2, 4, 8, 8)))
    labels = logits.argmax(1)
    a = segmentation_metrics(logits, target, 4)
    b = segmentation_metrics(labels.numpy(), target.numpy(), 4)
    np.testing.assert_array_equal(a["IoU"], b["IoU"])
    m = SegmentationMetric(4, class_names=["bg", "a", "b", "c"])
    m.update(labels[:1], target[:1])
    m.update(labels[1], target[1])
    np.testing.assert_array_equal(m.confusion, confusion_matrix(labels, target, 4))
    assert m.compute()["class_names"] == ["bg", "a", "b", "c"]
    other = SegmentationMetric(4)
    other.update(labels, target)
    m.merge(other)
    assert int(m.confusion.sum()) == 2 * 2 * 64
    # low-resolution logits: an error unless resize=True
    small = torch.from_numpy(rng.normal(size=(2, 4, 4, 4)))
    with pytest.raises(ValueError, match="resize"):
        segmentation_metrics(small, target, 4)
    assert segmentation_metrics(small, target, 4, resize=True)["aAcc"] >= 0
    with pytest.raises(ValueError, match="outside"):
        segmentation_metrics(labels, torch.full((2, 8, 8), 7), 4)
    with pytest.raises(ValueError, match="outside"):
        segmentation_metrics(torch.full((2, 8, 8), 9), target, 4)
    with pytest.raises(ValueError, match="does not match"):
        segmentation_metrics(labels[:, :4], target, 4)
    with pytest.raises(ValueError, match="classes"):
        segmentation_metrics(logits[:, :3], target, 4)
    with pytest.raises(TypeError):
        segmentation_metrics(labels, target.float(), 4)
    with pytest.raises(ValueError, match="NaN"):
        segmentation_metrics(torch.full((2, 4, 8, 8), float("nan")), target, 4)
    with pytest.raises(ValueError, match="no pixels"):
        SegmentationMetric(4).compute()


# ------------------------------------------------------------------------------------------------ normals
def test_normals_known_angles():
    z = torch.tensor([0.0, 0.0, 1.0])
    x = torch.tensor([1.0, 0.0, 0.0])
    target = torch.stack([z, z, z, z], dim=1).reshape(3, 1, 4)
    pred = torch.stack([z * 5.0, x, x * 0.1, -z], dim=1).reshape(3, 1, 4)  # 0, 90, 90, 180 degrees
    r = normal_metrics(pred, target, exact_median=True)
    assert r["mean_deg"] == pytest.approx(90.0)
    assert r["rmse_deg"] == pytest.approx(math.sqrt((0 + 8100 + 8100 + 32400) / 4))
    assert r["median_deg"] == pytest.approx(90.0)
    assert r["pct_within_11.25"] == pytest.approx(25.0) and r["pct_within_30"] == pytest.approx(25.0)
    assert r["num_pixels"] == 4
    # the official histogram median: the centre of the 0.5-degree bin holding the middle pixel
    assert normal_metrics(pred, target)["median_deg"] == pytest.approx(90.25)
    # the valid mask drops pixels; NaN is allowed only where invalid
    valid = torch.tensor([[True, True, False, False]])
    pred_nan = pred.clone()
    pred_nan[:, 0, 3] = float("nan")
    r = normal_metrics(pred_nan, target, valid=valid)
    assert r["mean_deg"] == pytest.approx(45.0) and r["pct_within_5"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="NaN"):
        normal_metrics(pred_nan, target)
    # a 45-degree tilt, accumulated over two batches
    m = NormalMetric()
    tilt = torch.tensor([1.0, 0.0, 1.0]).reshape(3, 1, 1).expand(3, 2, 2)
    m.update(tilt, z.reshape(3, 1, 1).expand(3, 2, 2))
    m.update(tilt.unsqueeze(0), z.reshape(1, 3, 1, 1).expand(1, 3, 2, 2))
    r = m.compute()
    assert r["mean_deg"] == pytest.approx(45.0) and r["pct_within_30"] == 0.0 and r["num_pixels"] == 8
    with pytest.raises(ValueError, match="shape"):
        normal_metrics(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="resize"):
        normal_metrics(torch.ones(3, 2, 2), torch.ones(3, 4, 4))
    up = normal_metrics(torch.ones(3, 2, 2), torch.ones(3, 4, 4), resize=True)
    assert up["mean_deg"] == pytest.approx(0, abs=1e-5) and up["num_pixels"] == 16
    with pytest.raises(TypeError):
        normal_metrics([[1.0]], torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="valid"):
        normal_metrics(torch.ones(3, 4, 4), torch.ones(3, 4, 4), valid=torch.ones(3, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- pointmap
def _plane(h=12, w=12, slope=0.0):
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) * 0.01, torch.arange(w, dtype=torch.float64) * 0.01,
                          indexing="ij")
    return torch.stack([u, v, slope * u])  # (3, H, W)


def test_pointmap_constant_offset_and_tilt():
    target = _plane().unsqueeze(0) + 1.0
    pred = target + torch.tensor([0.09, 0.12, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)  # distance 0.15
    r = pointmap_metrics(pred, target)
    assert r["l2_mean"] == pytest.approx(0.15) and r["rmse"] == pytest.approx(0.15)
    assert (r["x_mae"], r["y_mae"], r["z_mae"]) == pytest.approx((0.09, 0.12, 0.0))
    assert (r["pct_within_0.05"], r["pct_within_0.1"], r["pct_within_0.2"]) == (0.0, 0.0, 100.0)
    # A translation keeps the normals. Sobel-5 derivatives of a 0.01-spaced grid are 16 * 8 * 0.01 = 1.28 per
    # axis, so the cross product has length |n| = 1.28^2; the official n / (|n| + 1e-6) leaves unit normals
    # shortened by 1e-6 / |n|, so two equal normals score acos((|n| / (|n| + 1e-6))^2), not 0
    n = 1.28 ** 2
    shrink = n / (n + 1e-6)
    interior = torch.zeros(12, 12, dtype=torch.bool)
    interior[2:-2, 2:-2] = True  # pixels whose 5x5 window does not reach past the border
    r_in = pointmap_metrics(pred, target, valid=interior)
    assert r_in["normal_mean_deg"] == pytest.approx(math.degrees(math.acos(shrink ** 2)), rel=1e-6)
    assert r_in["normal_mean_deg"] < 0.1
    # on the outermost pixel ring the mirrored derivative across the border is 0: both normals degenerate to
    # 0 and score 90 degrees (as in the official code)
    ring = torch.ones(12, 12, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert pointmap_metrics(pred, target, valid=ring)["normal_mean_deg"] == pytest.approx(90.0)
    # a plane tilted by 30 degrees: Sobel normals are exact for a plane away from the border
    tilted = _plane(slope=math.tan(math.radians(30))).unsqueeze(0)
    r = pointmap_metrics(tilted, _plane().unsqueeze(0), valid=interior)
    n_tilted = n / math.cos(math.radians(30))
    cos = math.cos(math.radians(30)) * shrink * n_tilted / (n_tilted + 1e-6)
    assert r["normal_mean_deg"] == pytest.approx(math.degrees(math.acos(cos)), rel=1e-9)
    assert r["normal_mean_deg"] == pytest.approx(30.0, abs=1e-3)
    assert r["pct_normal_within_22.5"] == 0.0 and r["num_pixels"] == 64
    # invalid pixels may hold NaN (they are zeroed before the derivatives); valid ones may not
    t_nan = target.clone()
    t_nan[0, :, 0, 0] = float("nan")
    valid = torch.ones(12, 12)
    valid[0, 0] = 0
    assert math.isfinite(pointmap_metrics(pred, t_nan, valid=valid)["normal_mean_deg"])
    with pytest.raises(ValueError, match="NaN"):
        pointmap_metrics(pred, t_nan)
    m = PointmapMetric(surface_normals=False)
    m.update(pred[0], target[0])
    m.update(pred.numpy(), target.numpy(), valid=np.ones((1, 1, 12, 12)))
    r = m.compute()
    assert r["l2_mean"] == pytest.approx(0.15) and r["num_pixels"] == 288 and "normal_mean_deg" not in r
    with pytest.raises(ValueError, match="shape"):
        pointmap_metrics(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="merge"):
        m.merge(PointmapMetric())


# ------------------------------------------------------------------------------------------------- albedo
def test_albedo_psnr_of_a_known_mse():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(25.5 ** 2, 255.0) == pytest.approx(20.0)
    assert psnr_from_mse(0.0) == pytest.approx(120.0)
    rng = np.random.default_rng(8)
    target = torch.from_numpy(rng.uniform(0.2, 0.8, (2, 3, 16, 16)))
    r = albedo_metrics(target + 0.1, target)  # every channel off by 0.1: mse 0.01
    assert r["mae"] == pytest.approx(0.1) and r["mse"] == pytest.approx(0.01)
    assert r["psnr"] == pytest.approx(20.0) and r["data_range"] == 1.0
    assert r["grad_l1"] == pytest.approx(0.0, abs=1e-12)
    r = albedo_metrics(target, target)
    assert r["ssim"] == pytest.approx(1.0) and r["psnr"] == pytest.approx(120.0)
    # 0..255 targets: the official data-range rule picks 255
    r = albedo_metrics(target * 255 + 25.5, target * 255)
    assert r["data_range"] == 255.0 and r["psnr"] == pytest.approx(20.0)
    # half the pixels off by 0.2, the mask keeps only those: mse 0.04 -> 13.98 dB
    pred = target.clone()
    pred[:, :, :8] += 0.2
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[:, :8] = True
    r = albedo_metrics(pred, target, valid=valid)
    assert r["mse"] == pytest.approx(0.04) and r["psnr"] == pytest.approx(10 * math.log10(1 / 0.04))
    assert r["num_pixels"] == 256
    m = AlbedoMetric(data_range=1.0, ssim=False)
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])
    assert m.compute()["mse"] == pytest.approx(0.02) and "ssim" not in m.compute()
    with pytest.raises(ValueError, match="shape"):
        albedo_metrics(torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no valid"):
        AlbedoMetric().compute()


# ------------------------------------------------------------------------------------------------ matting
def test_matting_sad_mse_grad():
    target = torch.zeros(10, 10, dtype=torch.float64)
    pred = target.clone()
    pred[2:6, 2:6] = 0.5
    r = matting_metrics(pred, target)
    assert r["sad"] == pytest.approx(16 * 0.5 / 1000)
    assert r["mse"] == pytest.approx(16 * 0.25 / 100)
    assert r["grad"] > 0
    region = torch.zeros(10, 10, dtype=torch.bool)
    region[2:6, 2:6] = True
    r = matting_metrics(pred, target, valid=region)
    assert r["sad"] == pytest.approx(0.008) and r["mse"] == pytest.approx(0.25)
    same = matting_metrics(pred, pred)
    assert same["sad"] == 0 and same["mse"] == 0 and same["grad"] == 0
    # min-max normalisation: a matte and its contrast-scaled copy have the same gradient term
    step = torch.zeros(1, 12, 12, dtype=torch.float64)
    step[:, :, 6:] = 1.0
    assert matting_metrics(step * 0.5, step)["grad"] == pytest.approx(0.0, abs=1e-12)
    # uint8 alphas are /255; per-image averaging
    u8 = (pred * 255).round().to(torch.uint8)
    assert matting_metrics(u8, torch.zeros(10, 10, dtype=torch.uint8))["sad"] == pytest.approx(16 * 128 / 255 / 1000)
    m = MattingMetric()
    m.update(pred, target)
    m.update(torch.stack([target, target]), torch.stack([target, target]))
    r = m.compute()
    assert r["num_images"] == 3 and r["sad"] == pytest.approx(0.008 / 3)
    # the standard Gaussian-derivative kernel: 9x9, unit L2 norm, odd along x, the y kernel its transpose
    kx, ky = _gauss_derivative_kernels(1.4, 1e-2, torch.float64, "cpu")
    assert kx.shape == (9, 9) and float(kx.square().sum()) == pytest.approx(1.0)
    assert torch.allclose(kx, -kx.flip(1)) and torch.equal(ky, kx.T)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        matting_metrics(pred * 3, target)
    with pytest.raises(ValueError, match="does not match"):
        matting_metrics(pred[None].expand(2, 10, 10), target[None])
    with pytest.raises(TypeError):
        matting_metrics(pred.long(), target)
    with pytest.raises(ValueError, match="no images"):
        MattingMetric().compute()
