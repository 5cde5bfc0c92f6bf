"""Does the tiny pretraining preset learn? A k-NN probe on real images, before vs after training.

The images are scikit-learn's bundled digits (1797 greyscale 8x8 scans, 10 classes), upscaled to the
tiny preset's canvas and written as PNG files, so the trainer reads them like any image folder. A
fixed-seed stratified split keeps ``n_train`` images for pretraining (and as the k-NN memory bank)
and holds out the rest. After a short CPU run of the ``tiny`` preset on the train images, the
teacher's [CLS] (token 0 of the final-normed output) on the whole image at the global-view size is
probed on the held-out split; the same network at initialisation (the exact weights the trainer
starts from: same seed, student built then teacher, student weights copied in) is the baseline, and
k-NN on the raw pixels a reference. The labels are never seen by the pretraining; they only score
the probe.

Three k-NN readings, all on cosine similarity with the train split as the memory bank:

* ``knn20_weighted`` (decides ``learned``): features centred on the memory bank's mean, then DINO's
  vote: k=20 neighbours, each adding ``exp(sim / 0.07)`` to its class;
* ``knn10_majority``: centred, k=10, plain majority;
* ``knn20_weighted_uncentred``: DINO's kNN eval as is.

Centring matters at initialisation: with LayerScale at its official 1e-4 the [CLS] is almost the
same vector for every image (``spread`` ~2e-5), so uncentred cosine similarities differ only in the
last digits (the probe computes in float64 so that they still rank).

    python -m sapiens2.bench.pretrain_probe --out runs/probe [--steps N] [--global-batch B] [--set k=v ...]

writes ``DIR/images/{train,test}/*.png`` with ``DIR/{train,test}.jsonl`` manifests (``path``,
``label``, ``index``), the run in ``DIR/run/`` (``metrics.jsonl``, ``loss_curve.png``,
``backbone_teacher.safetensors``) and the result as ``DIR/probe.json``. :func:`run_probe` returns
the same dict; :func:`markdown_section` renders it for a README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Overrides of the tiny preset applied by this benchmark (on top of --steps / --global-batch).
# Only run-plumbing: the learning recipe is the preset's own unless --set changes it.
RUN_OVERRIDES = ("run.progress=false",)

# Named override sets on top of the tiny preset. "preset": the preset as shipped (the check).
# "no-koleo": the same without the KoLeo term, the ablation docs/pretraining.md reports.
RECIPES = {
    "preset": (),
    "no-koleo": ("objective.koleo_weight=0",),
}

DEFAULT_STEPS = 500
DEFAULT_GLOBAL_BATCH = 16
N_CLASSES = 10

# The k-NN readings: the first decides ``learned``.
PROBES = {
    "knn20_weighted": dict(k=20, T=0.07, weighted=True, center=True),
    "knn10_majority": dict(k=10, weighted=False, center=True),
    "knn20_weighted_uncentred": dict(k=20, T=0.07, weighted=True, center=False),
}
PROBE_LABELS = {
    "knn20_weighted": "k=20 weighted, centred",
    "knn10_majority": "k=10 majority, centred",
    "knn20_weighted_uncentred": "k=20 weighted, raw (DINO)",
}


# ----------------------------------------------------------------------------------------- data


def load_digits_arrays():
    """``(images uint8 (1797, 8, 8) in 0..255, labels int64 (1797,))`` from scikit-learn."""
    from ..extras import require

    datasets = require("sklearn.datasets", "bench", "the pretraining k-NN probe (scikit-learn's digits)")
    d = datasets.load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def upscale_digit(img8: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """One 8x8 greyscale digit -> ``canvas`` (H, W) RGB uint8: bicubic upscale of the square to the
    canvas' shorter side, centred and padded with the digits' own background (0, black)."""
    from PIL import Image

    H, W = canvas
    side = min(H, W)
    sq = np.asarray(Image.fromarray(img8, mode="L").resize((side, side), Image.Resampling.BICUBIC))
    out = np.zeros((H, W), dtype=np.uint8)
    top, left = (H - side) // 2, (W - side) // 2
    out[top:top + side, left:left + side] = sq
    return np.repeat(out[..., None], 3, axis=2)


def stratified_split(labels: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices, ``n_train`` train images, class proportions kept (scikit-learn's
    ``train_test_split(stratify=labels)`` with ``random_state=seed``)."""
    from ..extras import require

    ms = require("sklearn.model_selection", "bench", "the pretraining k-NN probe")
    idx = np.arange(len(labels))
    tr, te = ms.train_test_split(idx, train_size=n_train, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def export_digits(out: str, canvas: tuple[int, int] = (96, 72), n_train: int = 1000, seed: int = 0) -> dict:
    """Write the digits as ``out/images/{train,test}/NNNN.png`` (``canvas`` RGB) and the manifests
    ``out/train.jsonl`` / ``out/test.jsonl`` (one ``{"path", "label", "index"}`` per line, paths
    relative to ``out``). ``NNNN`` is the index in ``load_digits``. Returns the manifest paths and
    the split's sizes."""
    from PIL import Image

    images, labels = load_digits_arrays()
    tr, te = stratified_split(labels, n_train, seed)
    manifests = {}
    for split, ids in (("train", tr), ("test", te)):
        folder = os.path.join(out, "images", split)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for i in ids.tolist():
            rel = f"images/{split}/{i:04d}.png"
            Image.fromarray(upscale_digit(images[i], canvas)).save(os.path.join(out, rel))
            rows.append(json.dumps({"path": rel, "label": int(labels[i]), "index": i}))
        path = os.path.join(out, f"{split}.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(rows) + "\n")
        manifests[split] = path
    return {"train": manifests["train"], "test": manifests["test"], "n_train": len(tr), "n_test": len(te),
            "canvas": list(canvas)}


def load_manifest(path: str, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A manifest's images as the probe's input: ``(N, 3, H, W)`` ImageNet-normalised float32 at
    ``size`` (antialiased bilinear resize of the whole canvas), and their labels ``(N,)``."""
    from PIL import Image

    from ..pretrain.views import normalize

    root = os.path.dirname(os.path.abspath(path))
    imgs, labels = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                imgs.append(np.asarray(Image.open(os.path.join(root, row["path"])).convert("RGB")))
                labels.append(int(row["label"]))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return normalize(x), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------- probe


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 20, T: float = 0.07,
                weighted: bool = True, center: bool = True, num_classes: Optional[int] = None,
                chunk: int = 1024) -> Tensor:
    """k-NN class predictions for ``test_feats`` with ``(train_feats, train_labels)`` as the memory
    bank, on cosine similarity. ``weighted``: DINO's vote (each of the ``k`` neighbours adds
    ``exp(sim / T)`` to its class); otherwise a plain majority (ties to the lower class id).
    ``center``: subtract the memory bank's mean from both sides first (DINO's eval does not; without
    it a feature with a large shared component, such as the [CLS] of a network whose residual
    branches start at LayerScale 1e-4, has cosine similarities that differ only in float32 noise)."""
    C = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, train_feats.shape[0])
    train_feats, test_feats = train_feats.double(), test_feats.double()
    if center:
        mean = train_feats.mean(0, keepdim=True)
        train_feats, test_feats = train_feats - mean, test_feats - mean
    bank = F.normalize(train_feats, dim=1)
    preds = []
    for q in F.normalize(test_feats, dim=1).split(chunk):
        sim, idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.exp(sim / T) if weighted else torch.ones_like(sim)
        scores = torch.zeros(q.shape[0], C, dtype=votes.dtype).scatter_add_(1, train_labels[idx], votes)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, **kw) -> float:
    return float((knn_predict(train_feats, train_labels, test_feats, **kw) == test_labels).float().mean())


def probe_scores(train_feats, train_labels, test_feats, test_labels) -> dict:
    """The readings this benchmark reports (top-1 accuracy on the held-out split)."""
    return {name: knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes=N_CLASSES, **kw)
            for name, kw in PROBES.items()}


@torch.no_grad()
def cls_features(backbone, x: Tensor, batch: int = 256) -> Tensor:
    """Token 0 ([CLS]) of the backbone's final-normed output, eval mode."""
    backbone.eval()
    out = []
    for xb in x.split(batch):
        y = backbone(xb)
        out.append((y if y.dim() == 2 else y[:, 0]).float())
    return torch.cat(out)


def feature_spread(f: Tensor) -> float:
    """How image-dependent a feature is: mean ``|f_i - mean|`` over ``|mean|``."""
    f = f.double()
    m = f.mean(0)
    return float((f - m).norm(dim=1).mean() / m.norm().clamp_min(1e-30))


def initial_backbone(cfg):
    """The teacher backbone exactly as ``Pretrainer.__init__`` builds it before step 0: seed, student,
    teacher, the student's weights copied into the teacher."""
    from ..pretrain.objective import PretrainStudent, PretrainTeacher

    torch.manual_seed(cfg.run.seed)
    student = PretrainStudent(cfg)
    teacher = PretrainTeacher(cfg)
    for m_s, m_t in zip(student.ema_modules(), teacher.ema_modules()):
        m_t.load_state_dict(m_s.state_dict())
    return teacher.backbone


def build_config(steps: int = DEFAULT_STEPS, global_batch: int = DEFAULT_GLOBAL_BATCH, source: str = "synthetic",
                 overrides: tuple[str, ...] | list[str] = ()):
    from ..pretrain.config import tiny
    from ..train.config import apply_overrides

    cfg = tiny()
    cfg.data.source = source
    cfg.run.steps = steps
    cfg.run.global_batch = global_batch
    cfg.run.log_every = max(steps // 10, 1)
    cfg.run.checkpoint_every = steps  # one checkpoint, at the end
    apply_overrides(cfg, list(RUN_OVERRIDES) + list(overrides))
    return cfg


def _loss_summary(rows: list[dict], key: str) -> dict:
    ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not ys:
        return {}
    n = max(len(ys) // 10, 1)
    return {"first": ys[0], "last": ys[-1], "mean_first_10pct": float(np.mean(ys[:n])),
            "mean_last_10pct": float(np.mean(ys[-n:]))}


def run_probe(out: str, steps: int = DEFAULT_STEPS, global_batch: int = DEFAULT_GLOBAL_BATCH,
              overrides: tuple[str, ...] | list[str] = (), n_train: int = 1000, seed: int = 0,
              verbose: bool = True, recipe: str = "preset") -> dict:
    """Export the digits, pretrain the tiny preset (plus ``RECIPES[recipe]`` and ``overrides``) on the
    train split, probe init vs trained teacher. Returns the result dict (also ``out/probe.json``)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    overrides = list(RECIPES[recipe]) + list(overrides)
    from ..models.backbone import Sapiens2Backbone
    from ..pretrain.trainer import run_pretrain
    from ..train.metrics import read_metrics

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    cfg = build_config(steps, global_batch, overrides=overrides)
    data = export_digits(out, canvas=tuple(cfg.data.image_size), n_train=n_train, seed=seed)
    cfg.data.source = data["train"]
    t_data = time.perf_counter()

    run_dir = os.path.join(out, "run")
    res = run_pretrain(cfg, run_dir, export="teacher")
    t_train = time.perf_counter()

    size = tuple(cfg.objective.global_size)
    x_tr, y_tr = load_manifest(data["train"], size)
    x_te, y_te = load_manifest(data["test"], size)
    init = initial_backbone(cfg)
    trained = Sapiens2Backbone.from_checkpoint(os.path.join(run_dir, "backbone_teacher.safetensors"))
    scores, spread = {}, {}
    for name, net in (("init", init), ("trained", trained)):
        f_tr, f_te = cls_features(net, x_tr), cls_features(net, x_te)
        scores[name] = probe_scores(f_tr, y_tr, f_te, y_te)
        spread[name] = feature_spread(f_tr)
    scores["pixels"] = probe_scores(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te)  # reference, not a network
    t_end = time.perf_counter()

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    result = {
        "data": {"dataset": "sklearn.datasets.load_digits (8x8 greyscale, 10 classes)",
                 "canvas": data["canvas"], "upscale": "bicubic to the canvas' shorter side, centred, black padding",
                 "n_train": data["n_train"], "n_test": data["n_test"], "split_seed": seed,
                 "probe_input": list(size)},
        "pretrain": {"preset": "tiny", "recipe": recipe, "steps": res.steps_done, "global_batch": cfg.run.global_batch,
                     "images_seen": res.steps_done * cfg.run.global_batch,
                     "overrides": list(overrides), "run_overrides": list(RUN_OVERRIDES),
                     "seed": cfg.run.seed, "loss": _loss_summary(rows, "loss"),
                     "loss_mae": _loss_summary(rows, "loss_mae"), "loss_cl": _loss_summary(rows, "loss_cl"),
                     "log_num_prototypes": float(np.log(cfg.objective.head_prototypes))},
        "probe": {"features": "[CLS] (token 0, final-normed) of the teacher backbone",
                  "knn20_weighted": "train-mean centred, cosine, k=20, votes exp(sim/0.07) (DINO's vote)",
                  "knn10_majority": "train-mean centred, cosine, k=10, plain majority",
                  "knn20_weighted_uncentred": "cosine, k=20, votes exp(sim/0.07) (DINO's kNN eval as is)",
                  "spread": "mean distance of a train feature from the train mean / norm of the mean",
                  "memory_bank": "train split", "evaluated_on": "test split"},
        "accuracy": scores,
        "spread": spread,
        "learned": scores["trained"]["knn20_weighted"] > scores["init"]["knn20_weighted"],
        "time_s": {"export": t_data - t0, "pretrain": t_train - t_data, "probe": t_end - t_train,
                   "total": t_end - t0},
        "torch_threads": torch.get_num_threads(),
        "files": {"loss_curve": os.path.join(run_dir, "loss_curve.png"),
                  "teacher": os.path.join(run_dir, "backbone_teacher.safetensors"),
                  "metrics": os.path.join(run_dir, "metrics.jsonl")},
    }
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    if verbose:
        print(format_report(result))
    return result


# ----------------------------------------------------------------------------------------- report


def format_report(r: dict) -> str:
    a, p = r["accuracy"], r["pretrain"]
    lines = [
        f"k-NN probe on sklearn digits ({r['data']['n_train']} train / {r['data']['n_test']} test, "
        f"canvas {r['data']['canvas'][0]}x{r['data']['canvas'][1]}, probe input "
        f"{r['data']['probe_input'][0]}x{r['data']['probe_input'][1]})",
        f"pretrain: tiny preset ({p.get('recipe', 'preset')} recipe), {p['steps']} steps x {p['global_batch']} "
        f"images ({p['images_seen']} seen)"
        + (f", overrides {' '.join(p['overrides'])}" if p["overrides"] else ""),
        f"  loss     {p['loss'].get('first', float('nan')):.4f} -> {p['loss'].get('last', float('nan')):.4f}",
        f"  loss_mae {p['loss_mae'].get('first', float('nan')):.4f} -> {p['loss_mae'].get('last', float('nan')):.4f}",
        f"  loss_cl  {p['loss_cl'].get('first', float('nan')):.4f} -> {p['loss_cl'].get('last', float('nan')):.4f}"
        f"  (log K = {p['log_num_prototypes']:.4f})",
        f"{'':28}{'init':>8}{'trained':>9}{'pixels':>8}",
    ]
    for key, label in PROBE_LABELS.items():
        lines.append(f"  {label:<26}{a['init'][key]:>8.1%}{a['trained'][key]:>9.1%}{a['pixels'][key]:>8.1%}")
    sp = r.get("spread", {})
    if sp:
        lines.append(f"  [CLS] spread (|f - mean| / |mean|): init {sp['init']:.2e}, trained {sp['trained']:.2e}")
    t = r["time_s"]
    lines.append(f"learned (trained > init, {PROBE_LABELS['knn20_weighted']}): {r['learned']}")
    lines.append(f"time: {t['total']:.0f} s (export {t['export']:.0f}, pretrain {t['pretrain']:.0f}, probe "
                 f"{t['probe']:.0f}) on {r['torch_threads']} CPU threads")
    lines.append(f"loss curve: {r['files']['loss_curve']}")
    return "\n".join(lines)


def markdown_section(r: dict, curve_path: Optional[str] = None) -> str:
    """A README section from :func:`run_probe`'s dict."""
    a, p, d = r["accuracy"], r["pretrain"], r["data"]
    curve = curve_path or r["files"]["loss_curve"]
    over = f" with `{' '.join('--set ' + o for o in p['overrides'])}`" if p["overrides"] else ""
    return "\n".join([
        "### Does the tiny preset learn? A k-NN probe on real images",
        "",
        f"scikit-learn's bundled digits ({d['n_train']} train / {d['n_test']} held out, stratified, seed "
        f"{d['split_seed']}), upscaled to {d['canvas'][0]}x{d['canvas'][1]}; the `tiny` preset pretrained on the "
        f"train images for {p['steps']} steps x {p['global_batch']} on the CPU{over}. Probe: the teacher's [CLS] at "
        f"{d['probe_input'][0]}x{d['probe_input'][1]}, k-NN on cosine similarity with the train split as the memory "
        "bank; \"init\" is the same network before step 0.",
        "",
        "| k-NN on the [CLS] | init | trained | raw pixels |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {a['init'][k]:.1%} | {a['trained'][k]:.1%} | {a['pixels'][k]:.1%} |"
          for k, label in PROBE_LABELS.items()],
        "",
        f"Losses {p['loss']['first']:.3f} -> {p['loss']['last']:.3f} (MAE {p['loss_mae']['first']:.3f} -> "
        f"{p['loss_mae']['last']:.3f}, contrastive {p['loss_cl']['first']:.3f} -> {p['loss_cl']['last']:.3f}, "
        f"log K = {p['log_num_prototypes']:.3f}); {r['time_s']['total']:.0f} s in all.",
        "",
        f"![loss curve]({curve})",
    ])


def main(argv=None) -> int:
    from ..extras import MissingExtra

    ap = argparse.ArgumentParser(prog="python -m sapiens2.bench.pretrain_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the images, the run and probe.json")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--global-batch", type=int, default=DEFAULT_GLOBAL_BATCH,
                    help=f"images per step (default {DEFAULT_GLOBAL_BATCH})")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the tiny preset, e.g. --set objective.teacher_temp=0.04")
    ap.add_argument("--recipe", default="preset", choices=sorted(RECIPES),
                    help="preset: the tiny preset as shipped; no-koleo: the same without the KoLeo term "
                         "(an ablation)")
    ap.add_argument("--n-train", type=int, default=1000, help="train split size (the rest is held out)")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    args = ap.parse_args(argv)
    try:
        run_probe(args.out, args.steps, args.global_batch, args.set, args.n_train, args.seed, recipe=args.recipe)
    except (ValueError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
