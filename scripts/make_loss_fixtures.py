"""Regenerate tests/fixtures/losses_<task>.safetensors from the official Sapiens2 loss modules.

The official code is not part of this repository. Point this script at an official checkout (the
folder that holds ``sapiens/``)::

    mkdir -p /tmp/off_s2l
    git -C <sapiens2 clone> archive HEAD sapiens | tar -x -C /tmp/off_s2l
    python scripts/make_loss_fixtures.py /tmp/off_s2l --commit <that commit>

It imports the official loss files (``sapiens/pose/src/models/losses/heatmap_loss.py``,
``sapiens/dense/src/models/losses/*.py``) with tiny stand-ins for ``sapiens.registry`` and ``cv2`` in
``sys.modules`` (the package ``__init__`` files, which pull in the whole framework, are never run),
reads each task's ``loss_decode`` list from its Sapiens2-1B config, builds those loss classes with
those arguments, and calls them the way the official task head does (``PointmapHead.loss`` routing,
the trainer's ``.mean()`` of every returned tensor). For seeded small random inputs it stores, per
case, the inputs, every term's value and its gradient w.r.t. the prediction in float32, and the same
in float64 (values always, gradients when small) so the tests can hold float64 to a tight bound.

Metadata: ``kwargs`` (JSON: case -> the loss_decode entries used), ``official_sha256`` (JSON: file ->
sha256 of every official file the fixture depends on), ``mirror_commit``, ``seed``, ``torch``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import runpy
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

CONFIGS = {
    "pose": "sapiens/pose/configs/keypoints308/shutterstock_goliath_3po/sapiens2_1b_keypoints308_shutterstock_goliath_3po-1024x768.py",
    "seg": "sapiens/dense/configs/seg/shutterstock_goliath/sapiens2_1b_seg_shutterstock_goliath-1024x768.py",
    "normal": "sapiens/dense/configs/normal/metasim_render_people/sapiens2_1b_normal_metasim_render_people-1024x768.py",
    "albedo": "sapiens/dense/configs/albedo/render_people/sapiens2_1b_albedo_render_people-1024x768.py",
    "pointmap": "sapiens/dense/configs/pointmap/render_people/sapiens2_1b_pointmap_render_people-1024x768.py",
}
POSE_LOSSES = "sapiens/pose/src/models/losses/heatmap_loss.py"
DENSE_LOSSES = "sapiens/dense/src/models/losses"
HEADS = {
    "pose": "sapiens/pose/src/models/heads/pose_heatmap_head.py",
    "seg": "sapiens/dense/src/models/heads/seg_head.py",
    "normal": "sapiens/dense/src/models/heads/normal_head.py",
    "albedo": "sapiens/dense/src/models/heads/albedo_head.py",
    "pointmap": "sapiens/dense/src/models/heads/pointmap_head.py",
}
# The config's commented-out fine-tuning alternative; the paper describes the pose loss with OHEM.
POSE_OHKM = {"type": "KeypointOHKMMSELoss", "use_target_weight": True, "topk": 128}
SMALL = 2048  # store float64 gradients for predictions up to this many elements


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def import_official(root: str) -> dict:
    """The official loss classes by name, imported from ``root`` without running any package __init__."""

    class _Registry:
        def register_module(self, *a, **k):
            return (lambda cls: cls) if not a or not isinstance(a[0], type) else a[0]

    def package(name, path):
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
        return m

    package("sapiens", os.path.join(root, "sapiens"))
    reg = types.ModuleType("sapiens.registry")
    reg.MODELS = _Registry()
    sys.modules["sapiens.registry"] = reg
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")  # only the official debug visualiser uses it
    for sub in ("pose", "dense"):
        for part in ("", ".src", ".src.models", ".src.models.losses"):
            name = f"sapiens.{sub}{part}"
            package(name, os.path.join(root, *name.split(".")))
    classes = {}
    mods = ["sapiens.pose.src.models.losses.heatmap_loss"] + [
        f"sapiens.dense.src.models.losses.{m}"
        for m in ("seg_loss", "normal_loss", "pointmap_loss", "albedo_loss", "l1_loss", "silog_loss")
    ]
    for name in mods:
        mod = importlib.import_module(name)
        for k, v in vars(mod).items():
            if isinstance(v, type) and issubclass(v, torch.nn.Module) and v.__module__ == name:
                classes[k] = v
    return classes


def build(classes: dict, entry: dict) -> torch.nn.Module:
    kw = dict(entry)
    return classes[kw.pop("type")](**kw)


# ----------------------------------------------------------------------------------------------
# the official heads' calls (facts of PoseHeatmapHead/SegHead/NormalHead/AlbedoHead/PointmapHead.loss
# and of the trainer's parse_losses, which takes .mean() of every loss tensor)


def call_pose(loss, inp):
    return {"loss_kpt": loss(inp["pred"], inp["target"], inp["target_weight"]).mean()}


def call_seg(loss, inp):
    return {loss.loss_name: loss(inp["pred"], inp["labels"]).mean()}


def call_dense(loss, inp):  # normal, albedo
    return {loss.loss_name: loss(inp["pred"], inp["target"], valid_mask=inp.get("valid_mask")).mean()}


def call_pointmap(loss, inp):
    pred, gt, mask = inp["pred"], inp["target"], inp["valid_mask"]
    md = inp["mean_depth"].view(-1, 1, 1, 1)
    name = loss.loss_name
    if name == "loss_K_consistency":
        out = loss(pred, gt, valid_mask=mask, intrinsics=inp["intrinsics"])
    elif name == "loss_silog":
        out = loss(pred[:, 2:3], gt[:, 2:3], valid_mask=mask)
    elif name == "loss_normal":
        out = loss(pred, gt, valid_mask=mask, scale=inp["target_scale"].view(-1, 1))
    elif name == "loss_scale_l1":
        out = loss(inp["pred_scale"], inp["target_scale"].view(-1, 1))
    else:  # loss_l1, loss_shift_invariant, loss_multiscale_l1_2
        out = torch.clamp(loss(pred / md, gt / md, valid_mask=mask), max=4.0)
    return {name: out.mean()}


# ----------------------------------------------------------------------------------------------
# seeded inputs


def pose_inputs(g, B, K, H, W):
    target = torch.rand(B, K, H, W, generator=g) ** 4
    pred = target + 0.1 * torch.randn(B, K, H, W, generator=g)
    w = torch.tensor([0.0, 0.5, 1.0])[torch.multinomial(torch.tensor([0.2, 0.1, 0.7]), B * K, True, generator=g)]
    return {"pred": pred, "target": target, "target_weight": w.view(B, K)}


def seg_inputs(g, B, H, W, C=29, degenerate=False):
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.1] = 255
    if degenerate:  # sample 0: all ignored; sample 1: background + ignored only; sample 2: random
        labels[0] = 255
        labels[1] = torch.where(torch.rand(H, W, generator=g) < 0.5, 0, 255)
    else:  # sample 1 sees only a few classes, so absent classes matter for Dice
        few = torch.tensor([0, 3, 7, 12, 28])
        labels[1] = torch.where(labels[1] == 255, 255, few[torch.randint(0, 5, (H, W), generator=g)])
    return {"pred": 2 * torch.randn(B, C, H, W, generator=g), "labels": labels}


def mask(g, B, H, W, p=0.8):
    return (torch.rand(B, 1, H, W, generator=g) < p).float()


def normal_inputs(g, B, H, W):
    t = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
    pred = t + 0.5 * torch.randn(B, 3, H, W, generator=g)
    m = mask(g, B, H, W)
    # invalid pixels carry -200 in every channel, so the official default mask (target[:, 0] > -100)
    # is the same as the mask passed
    return {"pred": pred, "target": torch.where(m > 0, t, torch.full_like(t, -200.0)), "valid_mask": m}


def albedo_inputs(g, B, H, W):
    t = torch.rand(B, 3, H, W, generator=g)
    return {"pred": t + 0.2 * torch.randn(B, 3, H, W, generator=g), "target": t, "valid_mask": mask(g, B, H, W)}


def pointmap_inputs(g, B, H, W, noise):
    f = torch.tensor([[20.0, 22.0], [18.0, 19.0]])[:B]
    K = torch.zeros(B, 3, 3)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f[:, 0], f[:, 1], W / 2 - 0.3, H / 2 + 0.2, 1.0
    Z = 1.5 + 2 * torch.rand(B, 1, H, W, generator=g)
    u = torch.arange(W).view(1, 1, 1, W)
    v = torch.arange(H).view(1, 1, H, 1)
    X = (u - K[:, 0, 2].view(B, 1, 1, 1)) * Z / K[:, 0, 0].view(B, 1, 1, 1)
    Y = (v - K[:, 1, 2].view(B, 1, 1, 1)) * Z / K[:, 1, 1].view(B, 1, 1, 1)
    gt = torch.cat([X, Y, Z], 1) + 0.02 * torch.randn(B, 3, H, W, generator=g)
    m = torch.rand(B, 1, H, W, generator=g) < 0.75  # bool, as the data pipeline packs it
    md = torch.stack([gt[b, 2][m[b, 0]].mean() for b in range(B)])
    ts = 0.5 + 1.5 * torch.rand(B, generator=g)
    return {
        "pred": gt + noise * torch.randn(B, 3, H, W, generator=g),
        "target": gt,
        "valid_mask": m,
        "intrinsics": K,
        "mean_depth": md,
        "target_scale": ts,
        "pred_scale": (ts + 0.1 * torch.randn(B, generator=g)).view(B, 1),
    }


# ----------------------------------------------------------------------------------------------


def run_case(entries, classes, call, inp, dtype):
    """Every term's value and gradient (w.r.t. pred, and pred_scale when present) in ``dtype``."""
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}
    grad_keys = [k for k in ("pred", "pred_scale") if k in x]
    out = {}
    for e in entries:
        for k in grad_keys:
            x[k] = x[k].detach().requires_grad_()
        for name, val in call(build(classes, e), x).items():
            gs = torch.autograd.grad(val, [x[k] for k in grad_keys], allow_unused=True)
            out[name] = (val.detach(), {k: (gr if gr is not None else torch.zeros_like(x[k])).detach() for k, gr in zip(grad_keys, gs)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("official", help="official checkout: the folder that holds sapiens/")
    ap.add_argument("--commit", default=None, help="the official commit (default: git rev-parse in the checkout)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = os.path.abspath(args.official)
    if not os.path.isdir(os.path.join(root, "sapiens", "dense")):
        sys.exit(f"{root} does not hold sapiens/dense: pass the folder that contains sapiens/")
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "-C", root, "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    classes = import_official(root)
    cfg = {t: runpy.run_path(os.path.join(root, p))["model"]["decode_head"]["loss_decode"] for t, p in CONFIGS.items()}
    cfg = {t: (v if isinstance(v, list) else [v]) for t, v in cfg.items()}

    g = torch.Generator().manual_seed(args.seed)
    tasks = {
        "pose": (call_pose, POSE_LOSSES, {
            "mse_k308": (cfg["pose"], pose_inputs(g, 2, 308, 4, 3)),
            "ohkm_k308": ([POSE_OHKM], None),  # same inputs as mse_k308
            "mse_k17": (cfg["pose"], pose_inputs(g, 1, 17, 16, 12)),
            "ohkm_k17": ([dict(POSE_OHKM, topk=8)], None),
        }),
        "seg": (call_seg, "seg_loss.py", {
            "main": (cfg["seg"], seg_inputs(g, 2, 16, 12)),
            "degenerate": (cfg["seg"], seg_inputs(g, 3, 4, 3, degenerate=True)),
        }),
        "normal": (call_dense, "normal_loss.py l1_loss.py", {
            "main": (cfg["normal"], normal_inputs(g, 2, 16, 12)),
        }),
        "albedo": (call_dense, "albedo_loss.py l1_loss.py", {
            "main": (cfg["albedo"], albedo_inputs(g, 2, 16, 12)),
        }),
        "pointmap": (call_pointmap, "pointmap_loss.py l1_loss.py silog_loss.py", {
            "main": (cfg["pointmap"], pointmap_inputs(g, 2, 16, 12, noise=0.05)),
            "clamped": (cfg["pointmap"], pointmap_inputs(g, 2, 8, 6, noise=3.0)),  # l1 terms hit the clamp at 4
        }),
    }
    os.makedirs(args.out, exist_ok=True)
    for task, (call, files, cases) in tasks.items():
        files = [files] if files == POSE_LOSSES else [f"{DENSE_LOSSES}/{f}" for f in files.split()] + [f"{DENSE_LOSSES}/utils.py"]
        files += [CONFIGS[task], HEADS[task]]
        tensors, kwargs, prev = {}, {}, None
        for case, (entries, inp) in cases.items():
            inp = prev if inp is None else inp
            prev = inp
            kwargs[case] = entries
            for k, v in inp.items():
                tensors[f"{case}.input.{k}"] = v.contiguous()
            for dtype, tag in ((torch.float32, ""), (torch.float64, "64")):
                for name, (val, grads) in run_case(entries, classes, call, inp, dtype).items():
                    tensors[f"{case}.value{tag}.{name}"] = val.reshape(())
                    for k, gr in grads.items():
                        if tag == "" or gr.numel() <= SMALL:
                            tensors[f"{case}.grad{tag}.{name}.{k}"] = gr.contiguous()
        # inputs shared between cases are stored once per case; drop exact duplicates of the previous case
        for case in cases:
            if cases[case][1] is None:
                for k in list(tensors):
                    if k.startswith(f"{case}.input."):
                        del tensors[k]
        meta = {
            "kwargs": json.dumps(kwargs),
            "shared_inputs": json.dumps({c: list(cases)[i - 1] for i, c in enumerate(cases) if cases[c][1] is None}),
            "official_sha256": json.dumps({f: sha256(os.path.join(root, f)) for f in files}),
            "mirror_commit": commit,
            "seed": str(args.seed),
            "torch": torch.__version__,
            "generator": "scripts/make_loss_fixtures.py",
        }
        path = os.path.join(args.out, f"losses_{task}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"{path}: {len(tensors)} tensors, {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
