"""The k-NN probe machinery of ``sapiens2.bench.pretrain_probe`` (fast; the learning check itself is a
benchmark, ``python -m sapiens2.bench.pretrain_probe``, not a test)."""

import json
import os

import numpy as np
import pytest
import torch

from sapiens2.bench.pretrain_probe import (PROBES, feature_spread, knn_accuracy, knn_predict, markdown_section,
                                           format_report, upscale_digit)


def _clusters(n_per_class: int, classes: int, dims: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dims, generator=g), labels


@pytest.mark.parametrize("kw", list(PROBES.values()), ids=list(PROBES))
def test_knn_separable_features_are_classified(kw):
    x_tr, y_tr = _clusters(50, 10, 32, 0.3, seed=0)
    x_te, y_te = _clusters(20, 10, 32, 0.3, seed=0)  # same centres, fresh draws below
    x_te = x_te + 0.3 * torch.randn(x_te.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, num_classes=10, **kw) > 0.99


@pytest.mark.parametrize("kw", list(PROBES.values()), ids=list(PROBES))
def test_knn_random_labels_are_at_chance(kw):
    g = torch.Generator().manual_seed(2)
    x_tr, x_te = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    y_tr, y_te = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = knn_accuracy(x_tr, y_tr, x_te, y_te, num_classes=10, **kw)
    assert 0.05 < acc < 0.16  # chance is 0.1; 1000 draws -> std ~0.01


def test_knn_centring_recovers_a_feature_with_a_large_shared_part():
    """A [CLS] whose class signal rides on a constant 1e5 times larger (as at initialisation, where the
    residual branches start at LayerScale 1e-4): the centred probe still separates the classes."""
    x_tr, y_tr = _clusters(50, 10, 32, 0.3, seed=0)
    x_te, y_te = _clusters(20, 10, 32, 0.3, seed=0)
    shared = torch.randn(32, generator=torch.Generator().manual_seed(3)) * 1e5
    assert knn_accuracy(x_tr + shared, y_tr, x_te + shared, y_te, num_classes=10, center=True) > 0.99
    assert feature_spread(x_tr + shared) < 1e-3


def test_knn_weighted_vote_follows_the_closest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.05]])
    # majority of k=3: class 1 (two votes); DINO weighting with a small T: the nearest (class 0) wins.
    assert knn_predict(bank, labels, q, k=3, weighted=False, center=False).tolist() == [1]
    assert knn_predict(bank, labels, q, k=3, T=0.07, weighted=True, center=False).tolist() == [0]


def test_upscale_digit_fills_the_canvas_centred():
    img = np.zeros((8, 8), np.uint8)
    img[2:6, 3:5] = 255
    out = upscale_digit(img, (96, 72))
    assert out.shape == (96, 72, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # greyscale as RGB
    assert out[:12].max() == 0 and out[-12:].max() == 0  # padding above and below the 72x72 square
    assert out[48, 36, 0] > 200


def test_export_digits_writes_the_split(tmp_path):
    pytest.importorskip("sklearn")
    from sapiens2.bench.pretrain_probe import export_digits, load_manifest
    from sapiens2.train.data import open_source

    info = export_digits(str(tmp_path), canvas=(96, 72), n_train=1000, seed=0)
    assert (info["n_train"], info["n_test"]) == (1000, 797)
    assert len(os.listdir(tmp_path / "images" / "train")) == 1000
    assert len(os.listdir(tmp_path / "images" / "test")) == 797
    rows = [json.loads(line) for line in open(info["train"])]
    test_rows = [json.loads(line) for line in open(info["test"])]
    assert len(rows) == 1000 and len(test_rows) == 797
    assert not {r["index"] for r in rows} & {r["index"] for r in test_rows}
    counts = np.bincount([r["label"] for r in rows], minlength=10)
    assert counts.min() >= 95 and counts.max() <= 105  # stratified: ~100 per class
    assert len(open_source(info["train"])) == 1000  # the trainer reads the manifest
    x, y = load_manifest(info["test"], (64, 48))
    assert x.shape == (797, 3, 64, 48) and x.dtype == torch.float32 and y.shape == (797,)


def test_report_and_markdown_render():
    acc = {k: 0.5 for k in PROBES}
    loss = {"first": 6.5, "last": 6.0, "mean_first_10pct": 6.5, "mean_last_10pct": 6.0}
    r = {"data": {"n_train": 1000, "n_test": 797, "canvas": [96, 72], "probe_input": [64, 48], "split_seed": 0},
         "pretrain": {"steps": 10, "global_batch": 16, "images_seen": 160, "overrides": ["objective.lambda_cl=2"],
                      "loss": loss, "loss_mae": loss, "loss_cl": loss, "log_num_prototypes": 5.545},
         "accuracy": {"init": acc, "trained": acc, "pixels": acc}, "spread": {"init": 1e-5, "trained": 1e-2},
         "learned": False, "time_s": {"export": 1, "pretrain": 2, "probe": 3, "total": 6}, "torch_threads": 2,
         "files": {"loss_curve": "run/loss_curve.png"}}
    assert "learned" in format_report(r)
    md = markdown_section(r)
    assert "| k-NN on the [CLS] |" in md and "--set objective.lambda_cl=2" in md
