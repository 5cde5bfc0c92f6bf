"""Evaluation metrics for the six dense human tasks of Sapiens2.

Each task has an accumulator class (``update(pred, target[, valid])`` per batch, ``compute()`` at the end,
``reset()``, ``merge(other)``) and a one-shot function over a single batch:

* pose (308 keypoints): ``KeypointAP`` / ``keypoint_ap``: COCO AP and AR with OKS, computed by
  xtcocotools' (or pycocotools') ``COCOeval``; ``oks_matrix``, ``oks_nms``; the keypoint metadata
  (``KEYPOINT_NAMES``, ``SIGMAS``, ``FLIP_PAIRS``, ``SKELETON``, ``PARTS``) in ``keypoints308``;
* body-part segmentation: ``SegmentationMetric`` / ``segmentation_metrics``: mIoU, mAcc, aAcc, per-class IoU
  and accuracy from a confusion matrix;
* surface normals: ``NormalMetric`` / ``normal_metrics``: mean, median and RMSE angle, % of pixels within
  5 / 11.25 / 22.5 / 30 degrees;
* pointmaps: ``PointmapMetric`` / ``pointmap_metrics``: mean L2 distance, RMSE, per-axis MAE, % within a
  distance, and the angle between the surface normals derived from the two pointmaps;
* albedo: ``AlbedoMetric`` / ``albedo_metrics``: MAE, RMSE, PSNR, gradient L1, masked SSIM;
* alpha matting: ``MattingMetric`` / ``matting_metrics``: SAD, MSE, gradient error.

Ratios are fractions in [0, 1] except keys starting with ``pct_``, which are percentages. Each module's
docstring gives the exact definitions and where they follow the official Sapiens2 evaluators. The dense
metrics take torch tensors or numpy arrays and accumulate in float64 on the inputs' device; only
``KeypointAP`` needs an optional package (``pip install 'sapiens2[eval]'``), imported when it is constructed.
"""

from .albedo import AlbedoMetric, albedo_metrics, psnr_from_mse
from .keypoints import KeypointAP, keypoint_ap, load_coco_backend, oks_matrix, oks_nms
from .keypoints308 import FLIP_INDICES, FLIP_PAIRS, KEYPOINT_NAMES, NUM_KEYPOINTS, PARTS, SIGMAS, SKELETON
from .matting import MattingMetric, matting_metrics
from .normals import NormalMetric, normal_metrics
from .pointmap import PointmapMetric, pointmap_metrics
from .segmentation import SegmentationMetric, confusion_matrix, segmentation_metrics

__all__ = [
    "AlbedoMetric", "albedo_metrics", "psnr_from_mse",
    "KeypointAP", "keypoint_ap", "load_coco_backend", "oks_matrix", "oks_nms",
    "FLIP_INDICES", "FLIP_PAIRS", "KEYPOINT_NAMES", "NUM_KEYPOINTS", "PARTS", "SIGMAS", "SKELETON",
    "MattingMetric", "matting_metrics",
    "NormalMetric", "normal_metrics",
    "PointmapMetric", "pointmap_metrics",
    "SegmentationMetric", "confusion_matrix", "segmentation_metrics",
]
