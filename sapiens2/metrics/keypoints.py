"""Keypoint AP: COCO-style average precision with OKS over the 308 Sapiens2 keypoints.

The matching, precision/recall accumulation and the 10 summary numbers are computed by the COCO API itself,
``COCOeval`` with iouType "keypoints" on COCO-format dicts built in memory (no files): ``xtcocotools`` (the
package the official evaluator uses, which takes ``sigmas`` and ``use_area`` arguments), or ``pycocotools``
when xtcocotools is missing or fails to import (its ``params.kpt_oks_sigmas`` set to the same sigmas). For
iouType "keypoints" both run the same algorithm, so the numbers agree; the result says which one was used.
``pip install 'sapiens2[eval]'`` installs them.

OKS (``oks_matrix``, the same formula as ``COCOeval.computeOks``): for a ground-truth person with labelled
keypoints (visibility > 0) and area ``A`` (its annotated ``area``; ``use_area=False``: 0.53 * box w * h),

    OKS = mean over labelled k of exp(-d_k^2 / (2 * A * (2 * sigma_k)^2))

with ``d_k`` the pixel distance between predicted and true keypoint k. A ground truth with no labelled keypoint
is ignored by COCOeval; its OKS is computed from the distance of each predicted keypoint to a box twice the
size of its bounding box, which only decides which predictions it absorbs.

Predictions go through the official evaluator's steps first (switch them off with ``rescore=False`` and
``nms_thr=None``):

1. ``rescore``: a person's score = its ``score`` (the detection/box score) x the mean of its keypoint scores
   above ``keypoint_score_thr`` (0.2; 0 when none is);
2. OKS non-maximum suppression per image (``nms_thr`` 0.9): greedily by score, drop the persons whose OKS with a
   kept one exceeds the threshold; this OKS uses all keypoints and the mean of the two persons' areas, each the
   area of its keypoints' bounding box;
3. a person whose keypoint scores are all <= 0 is dropped (xtcocotools does this, pycocotools does not; doing it
   here makes the backends agree).

Data layout, one dict per image, predictions and ground truths aligned by position:

* prediction: ``keypoints`` (N, K, 3) as x, y, score, or (N, K, 2) with ``keypoint_scores`` (N, K);
  ``scores`` (N,) person scores (default 1);
* ground truth: ``keypoints`` (M, K, 3) as x, y, visibility (0 = not labelled; COCO uses 1 = labelled but
  occluded, 2 = visible: both count); ``boxes`` (M, 4) COCO x, y, w, h (default: the box of the labelled
  keypoints); ``areas`` (M,) (default: box w * h; COCO and Goliath annotations carry their own); ``iscrowd``
  (M,) (default 0).

Results are the COCO keypoint summary: ``AP`` (mean over OKS thresholds 0.50:0.05:0.95), ``AP50``, ``AP75``,
``AP_M`` (areas 32^2..96^2), ``AP_L`` (> 96^2), and the same for ``AR``, with at most 20 persons per image; -1
where COCO leaves a number undefined (no ground truth in that area range). ``parts=True`` adds the official
per-part numbers (``body/AP``, ``foot/AP``, ``face/AP``, ``left_hand/AP``, ``right_hand/AP``, ...) from the
same persons and scores, the sigmas and keypoints sliced to the part.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Mapping, Sequence

import numpy as np

from ..extras import require
from .keypoints308 import PARTS, SIGMAS

__all__ = ["KeypointAP", "keypoint_ap", "oks_matrix", "oks_nms", "load_coco_backend", "STAT_NAMES"]

STAT_NAMES = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
EVAL_PARTS = ("body", "foot", "face", "left_hand", "right_hand")  # the official per-part evaluations
_EPS = np.spacing(1)  # COCOeval's guard against a zero area


# ----------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class CocoBackend:
    name: str
    version: str
    COCO: Any
    COCOeval: Any

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _xtcocotools() -> CocoBackend:
    # xtcocotools' prebuilt wheels are compiled against numpy 1.x; under numpy 2 its extension fails to load
    # with a ValueError ("numpy.dtype size changed"), which is caught like a missing package
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval
    return CocoBackend("xtcocotools", _version("xtcocotools"), COCO, COCOeval)


def _pycocotools() -> CocoBackend:
    require("pycocotools.cocoeval", "eval", "keypoint AP (xtcocotools, or pycocotools as the fallback)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return CocoBackend("pycocotools", _version("pycocotools"), COCO, COCOeval)


def load_coco_backend(backend: str = "auto") -> CocoBackend:
    """``"auto"``: xtcocotools if it imports, else pycocotools (a warning says why xtcocotools was passed over
    when it is installed but broken); ``"xtcocotools"`` or ``"pycocotools"`` to insist on one. Neither
    installed raises ``MissingExtra`` naming ``pip install 'sapiens2[eval]'``."""
    if backend not in ("auto", "xtcocotools", "pycocotools"):
        raise ValueError(f"backend must be 'auto', 'xtcocotools' or 'pycocotools', got {backend!r}")
    if backend == "pycocotools":
        return _pycocotools()
    try:
        return _xtcocotools()
    except (ImportError, ValueError) as e:
        # installed but broken (e.g. the numpy ABI error, or a missing dependency), or simply not there
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "xtcocotools").split(".")[0] == "xtcocotools"
        installed = not missing
        if backend == "xtcocotools":
            if installed:
                raise ImportError(f"xtcocotools is installed but does not load ({type(e).__name__}: {e}); its "
                                  "prebuilt wheels need numpy < 2: rebuild it against this numpy with "
                                  "pip install --no-build-isolation --no-binary xtcocotools --force-reinstall "
                                  "xtcocotools (needs cython)") from e
            require("xtcocotools.cocoeval", "eval", "keypoint AP with xtcocotools")
        if installed:
            warnings.warn(f"xtcocotools does not load ({type(e).__name__}: {e}); keypoint AP falls back to "
                          "pycocotools", RuntimeWarning, stacklevel=3)
        return _pycocotools()


# ---------------------------------------------------------------------------------------------------- OKS
def oks_matrix(pred_keypoints, gt_keypoints, gt_areas, sigmas=SIGMAS, gt_boxes=None, use_area: bool = True
               ) -> np.ndarray:
    """(D, G) OKS between D predicted persons ((D, K, 2+) x, y[, score]) and G ground-truth persons
    ((G, K, 3) x, y, visibility), the formula of ``COCOeval.computeOks`` (module docstring).

    ``gt_boxes`` (G, 4) x, y, w, h are needed for a ground truth without labelled keypoints and for
    ``use_area=False``."""
    sig = np.asarray(sigmas, dtype=np.float64)
    d = np.asarray(pred_keypoints, dtype=np.float64)
    g = np.asarray(gt_keypoints, dtype=np.float64)
    K = sig.shape[0]
    if d.ndim != 3 or d.shape[1] != K or d.shape[2] < 2:
        raise ValueError(f"pred_keypoints must be (D, {K}, 2 or 3), got {d.shape}")
    if g.ndim != 3 or g.shape[1:] != (K, 3):
        raise ValueError(f"gt_keypoints must be (G, {K}, 3), got {g.shape}")
    G = g.shape[0]
    areas = np.broadcast_to(np.asarray(gt_areas, dtype=np.float64), (G,))
    boxes = None if gt_boxes is None else np.asarray(gt_boxes, dtype=np.float64).reshape(G, 4)
    var2 = (2.0 * sig) ** 2
    out = np.zeros((d.shape[0], G))
    for j in range(G):
        xg, yg, vg = g[j, :, 0], g[j, :, 1], g[j, :, 2]
        labelled = vg > 0
        if use_area:
            scale = areas[j]
        else:
            if boxes is None:
                raise ValueError("use_area=False needs gt_boxes")
            scale = boxes[j, 2] * boxes[j, 3] * 0.53
        if labelled.any():
            dx = d[:, :, 0] - xg
            dy = d[:, :, 1] - yg
        else:
            if boxes is None:
                raise ValueError("a ground truth without labelled keypoints needs gt_boxes")
            bx, by, bw, bh = boxes[j]
            x0, x1, y0, y1 = bx - bw, bx + 2 * bw, by - bh, by + 2 * bh
            dx = np.maximum(0, x0 - d[:, :, 0]) + np.maximum(0, d[:, :, 0] - x1)
            dy = np.maximum(0, y0 - d[:, :, 1]) + np.maximum(0, d[:, :, 1] - y1)
        e = (dx ** 2 + dy ** 2) / var2 / (scale + _EPS) / 2
        if labelled.any():
            e = e[:, labelled]
        out[:, j] = np.exp(-e).mean(axis=1)
    return out


def _kpt_box_area(kpts: np.ndarray) -> np.ndarray:
    """(N, K, 2+) -> (N,) area of each person's keypoint bounding box."""
    return np.ptp(kpts[:, :, 0], axis=1) * np.ptp(kpts[:, :, 1], axis=1)


def oks_nms(keypoints, scores, sigmas=SIGMAS, thr: float = 0.9) -> np.ndarray:
    """Indices kept by greedy OKS non-maximum suppression (the official evaluator's step 2), best score first.

    OKS between persons i and j here: mean over all K keypoints of exp(-d^2 / (2 * (2 sigma)^2 * (a_i + a_j) / 2)),
    a the area of each person's keypoint bounding box; j is dropped when it exceeds ``thr`` for a kept i."""
    k = np.asarray(keypoints, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if k.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    sig = np.asarray(sigmas, dtype=np.float64)
    areas = _kpt_box_area(k)
    var2 = (2.0 * sig) ** 2
    order = np.argsort(-s, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        d2 = ((k[rest, :, 0] - k[i, :, 0]) ** 2 + (k[rest, :, 1] - k[i, :, 1]) ** 2)
        e = d2 / var2 / ((areas[i] + areas[rest])[:, None] / 2 + _EPS) / 2
        oks = np.exp(-e).mean(axis=1)
        order = rest[oks <= thr]
    return np.asarray(keep, dtype=np.int64)


# ------------------------------------------------------------------------------------------ input checks
def _np(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, (np.ndarray, list, tuple, float, int)):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _check_pred(p: Mapping, i: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(p, Mapping):
        raise TypeError(f"prediction {i} must be a dict, got {type(p).__name__}")
    if "keypoints" not in p:
        raise ValueError(f"prediction {i} has no 'keypoints'")
    k = _np(p["keypoints"], f"prediction {i} keypoints")
    if k.size == 0:
        k = k.reshape(0, K, 3)
    if k.ndim == 2 and k.shape[-1] in (2, 3) and k.shape[0] == K:
        k = k[None]  # one person given without the person axis
    if k.ndim != 3 or k.shape[2] not in (2, 3):
        raise ValueError(f"prediction {i} keypoints must be (N, K, 3) or (N, K, 2), got {k.shape}")
    if k.shape[1] != K:
        raise ValueError(f"prediction {i} has {k.shape[1]} keypoints per person, expected {K}")
    if k.shape[2] == 2:
        if "keypoint_scores" not in p:
            raise ValueError(f"prediction {i} keypoints are (N, K, 2): give 'keypoint_scores' (N, K) too")
        ks = _np(p["keypoint_scores"], f"prediction {i} keypoint_scores")
        ks = ks.reshape(-1, K) if ks.size else np.zeros((0, K))
        if ks.shape != k.shape[:2]:
            raise ValueError(f"prediction {i} keypoint_scores shape {ks.shape} != {k.shape[:2]}")
        k = np.concatenate([k, ks[:, :, None]], axis=2)
    n = k.shape[0]
    s = np.ones(n) if p.get("scores") is None else _np(p["scores"], f"prediction {i} scores").reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"prediction {i} has {n} persons but {s.shape[0]} scores")
    return k, s


def _check_gt(g: Mapping, i: int, K: int) -> dict:
    if not isinstance(g, Mapping):
        raise TypeError(f"ground truth {i} must be a dict, got {type(g).__name__}")
    if "keypoints" not in g:
        raise ValueError(f"ground truth {i} has no 'keypoints'")
    k = _np(g["keypoints"], f"ground truth {i} keypoints")
    if k.size == 0:
        k = k.reshape(0, K, 3)
    if k.ndim == 2 and k.shape == (K, 3):
        k = k[None]
    if k.ndim != 3 or k.shape[2] != 3:
        raise ValueError(f"ground truth {i} keypoints must be (M, K, 3) as x, y, visibility, got {k.shape}")
    if k.shape[1] != K:
        raise ValueError(f"ground truth {i} has {k.shape[1]} keypoints per person, expected {K}")
    if (k[:, :, 2] < 0).any():
        raise ValueError(f"ground truth {i} has negative visibility flags")
    m = k.shape[0]
    if g.get("boxes") is not None:
        boxes = _np(g["boxes"], f"ground truth {i} boxes")
        boxes = boxes.reshape(-1, 4) if boxes.size else np.zeros((0, 4))
        if boxes.shape != (m, 4):
            raise ValueError(f"ground truth {i} boxes must be ({m}, 4) x, y, w, h, got {boxes.shape}")
        if (boxes[:, 2:] < 0).any():
            raise ValueError(f"ground truth {i} boxes have a negative width or height (they are x, y, w, h)")
    else:
        boxes = np.zeros((m, 4))
        for j in range(m):
            lab = k[j, :, 2] > 0
            if lab.any():
                x0, y0 = k[j, lab, 0].min(), k[j, lab, 1].min()
                boxes[j] = (x0, y0, k[j, lab, 0].max() - x0, k[j, lab, 1].max() - y0)
    if g.get("areas") is not None:
        areas = _np(g["areas"], f"ground truth {i} areas").reshape(-1)
        if areas.shape != (m,):
            raise ValueError(f"ground truth {i} has {m} persons but {areas.shape[0]} areas")
        if (areas < 0).any():
            raise ValueError(f"ground truth {i} has negative areas")
    else:
        areas = boxes[:, 2] * boxes[:, 3]
    crowd = np.zeros(m, dtype=bool) if g.get("iscrowd") is None else np.asarray(g["iscrowd"]).reshape(-1) != 0
    if crowd.shape != (m,):
        raise ValueError(f"ground truth {i} has {m} persons but {crowd.shape[0]} iscrowd flags")
    return {"keypoints": k, "boxes": boxes, "areas": areas, "iscrowd": crowd}


# ------------------------------------------------------------------------------------------- evaluation
def _summarize(backend: CocoBackend, gts: list[dict], dets: list[list[tuple[np.ndarray, float]]],
               sigmas: np.ndarray, idx: Sequence[int] | None, use_area: bool) -> list[float]:
    """Run COCOeval on in-memory dicts; ``idx`` selects a subset of keypoints (a part)."""
    sel = slice(None) if idx is None else list(idx)
    sig = np.asarray(sigmas, dtype=np.float64)[sel]
    images = [{"id": i + 1} for i in range(len(gts))]
    cats = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": [], "skeleton": []}]
    anns = []
    for img, g in enumerate(gts):
        for j in range(g["keypoints"].shape[0]):
            kp = g["keypoints"][j, sel]
            anns.append({
                "id": len(anns) + 1,  # COCOeval takes a matched gt id of 0 for "unmatched": ids start at 1
                "image_id": img + 1, "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                "num_keypoints": int((kp[:, 2] > 0).sum()), "bbox": g["boxes"][j].tolist(),
                "area": float(g["areas"][j]), "iscrowd": int(g["iscrowd"][j])})
    results = []
    for img, persons in enumerate(dets):
        for kp, score in persons:
            kp = kp[sel]
            if not (kp[:, 2] > 0).any():  # xtcocotools drops these; so do we, for both backends
                continue
            results.append({"image_id": img + 1, "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                            "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):  # the COCO API prints its progress
        coco_gt = backend.COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list in pycocotools
            coco_dt = backend.COCO()
            coco_dt.dataset = {"images": images, "annotations": [], "categories": cats}
            coco_dt.createIndex()
        if backend.name == "xtcocotools":
            ev = backend.COCOeval(coco_gt, coco_dt, "keypoints", sig, use_area=use_area)
        else:
            if not use_area:
                raise ValueError("use_area=False (OKS scale 0.53 * box area) needs xtcocotools")
            ev = backend.COCOeval(coco_gt, coco_dt, "keypoints")
            ev.params.kpt_oks_sigmas = sig
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


class KeypointAP:
    """Accumulates per-image predictions and ground truths; ``compute()`` runs COCOeval over all of them.

    ``update(pred, target)`` takes one image's dicts, or equal-length sequences of them (module docstring)."""

    def __init__(self, sigmas=SIGMAS, use_area: bool = True, backend: str = "auto", rescore: bool = True,
                 keypoint_score_thr: float = 0.2, nms_thr: float | None = 0.9, parts: bool = False):
        self.sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if self.sigmas.size == 0 or not np.isfinite(self.sigmas).all() or (self.sigmas <= 0).any():
            raise ValueError("sigmas must be positive finite numbers")
        if parts and self.sigmas.shape[0] != len(SIGMAS):
            raise ValueError(f"parts=True needs the {len(SIGMAS)} Sapiens2 keypoints")
        self.use_area = use_area
        self.backend = load_coco_backend(backend)
        if self.backend.name == "pycocotools" and not use_area:
            raise ValueError("use_area=False (OKS scale 0.53 * box area) needs xtcocotools")
        self.rescore = rescore
        self.keypoint_score_thr = float(keypoint_score_thr)
        self.nms_thr = nms_thr
        self.parts = parts
        self.reset()

    @property
    def num_keypoints(self) -> int:
        return int(self.sigmas.shape[0])

    def reset(self) -> None:
        self._gts: list[dict] = []
        self._dets: list[list[tuple[np.ndarray, float]]] = []

    def update(self, pred, target) -> None:
        if isinstance(pred, Mapping) != isinstance(target, Mapping):
            raise TypeError("pred and target must both be one image's dict or both sequences of them")
        preds, targets = ([pred], [target]) if isinstance(pred, Mapping) else (list(pred), list(target))
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} prediction images for {len(targets)} ground-truth images")
        K = self.num_keypoints
        checked = []
        for p, g in zip(preds, targets):  # validate the whole batch before keeping any of it
            i = len(self._gts) + len(checked)
            checked.append((_check_pred(p, i, K), _check_gt(g, i, K)))
        for (kpts, scores), gt in checked:
            self._gts.append(gt)
            self._dets.append(self._prepare(kpts, scores))

    def merge(self, other: "KeypointAP") -> None:
        """Append another accumulator's images (after this one's), e.g. one gathered from another process."""
        if not isinstance(other, KeypointAP) or other.num_keypoints != self.num_keypoints:
            raise ValueError("cannot merge a KeypointAP over a different keypoint set")
        self._gts.extend(other._gts)
        self._dets.extend(other._dets)

    def _prepare(self, kpts: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, float]]:
        if self.rescore:
            ks = kpts[:, :, 2]
            above = ks > self.keypoint_score_thr
            cnt = above.sum(axis=1)
            mean = np.where(cnt > 0, (ks * above).sum(axis=1) / np.maximum(cnt, 1), 0.0)
            scores = scores * mean
        keep = np.arange(kpts.shape[0]) if self.nms_thr is None else oks_nms(kpts, scores, self.sigmas, self.nms_thr)
        return [(kpts[i], float(scores[i])) for i in keep]

    def compute(self) -> dict:
        if not self._gts:
            raise ValueError("no images accumulated: call update() first")
        stats = _summarize(self.backend, self._gts, self._dets, self.sigmas, None, self.use_area)
        out: dict[str, Any] = dict(zip(STAT_NAMES, stats))
        if self.parts:
            for part in EVAL_PARTS:
                pstats = _summarize(self.backend, self._gts, self._dets, self.sigmas, PARTS[part], self.use_area)
                out.update({f"{part}/{k}": v for k, v in zip(STAT_NAMES, pstats)})
        out["num_images"] = len(self._gts)
        out["backend"] = str(self.backend)
        return out


def keypoint_ap(predictions: Sequence[Mapping], ground_truths: Sequence[Mapping], sigmas=SIGMAS,
                use_area: bool = True, backend: str = "auto", rescore: bool = True, keypoint_score_thr: float = 0.2,
                nms_thr: float | None = 0.9, parts: bool = False) -> dict:
    """One-shot form of :class:`KeypointAP`: per-image prediction and ground-truth dicts, aligned by position."""
    m = KeypointAP(sigmas, use_area, backend, rescore, keypoint_score_thr, nms_thr, parts)
    m.update(predictions, ground_truths)
    return m.compute()
