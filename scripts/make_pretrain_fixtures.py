"""Regenerate tests/fixtures/pretrain_parity.safetensors from the two pretraining-loss anchors.

The anchors are not part of this repository and no upstream code is copied here: this script
imports them from the paths given on its command line and calls their functions as they are::

    python scripts/make_pretrain_fixtures.py --dinov3 /path/to/dinov3 --mae /path/to/mae \\
        --out tests/fixtures/pretrain_parity.safetensors

``--dinov3`` is the root of a facebookresearch/dinov3 work tree (the file used is
``dinov3/loss/dino_clstoken_loss.py``, class ``DINOLoss``); ``--mae`` is the root of a
facebookresearch/mae work tree (``models_mae.py``, class ``MaskedAutoencoderViT``). The fixture in
the repo was made from dinov3 6876159a11b4df116f30f667f8c9888617df0751 and mae
efb2a8062c206524e35e47d04501ed4f544c0ae8 (the sha256 of both files is in the metadata).

If ``dinov3.distributed`` cannot be imported, a stub module takes its place (torch.distributed is
never initialised here, so its functions are never called). If timm cannot be imported, a stub
``timm.models.vision_transformer`` provides ``PatchEmbed``/``Block`` placeholders (only needed at
import time). No model is built: the unbound MAE methods are called on a lightweight ``self``.

Everything is float32 on CPU, seeded with torch.manual_seed. Scalars are stored as 0-d tensors:
temperatures as float32 (``sk.temp``, ``sk2.temp``, ``center.temp``, ``dino*.student_temp``),
counts as int64 (``sk.n_iters``, ``sk2.n_iters``, ``mae*.patch``). Shapes are those of the
tensors. The safetensors metadata has one key, ``provenance``, a JSON string recording the anchor
files' sha256s and commits, the seed and the torch version; nothing a test needs.

Tensors (exact shapes: the *_CASES tables below):

* ``sk.*``, ``sk2.*``: ``out = DINOLoss.sinkhorn_knopp_teacher(logits, temp, n_iterations)``.
  The anchor exponentiates ``logits / temp`` without subtracting a maximum, so the logits are
  drawn small enough (``|logits| / temp`` well under 88) for float32 ``exp`` not to overflow.
* ``center.*``: ``out = softmax_center_teacher(logits, temp, update_centers=False)`` with the
  loss's ``center`` buffer set to ``center.center`` (1, K).
* ``dino.*`` (S=4, T=2), ``dino2.*`` (S=T=2): ``loss``/``loss_nodiag`` = ``DINOLoss.forward(student,
  teacher_probs, ignore_diagonal=False/True)`` with ``student_temp``; ``grad``/``grad_nodiag`` are
  the autograd gradients of those losses w.r.t. ``student``.
* ``mae.*`` (64x48, p=16), ``mae2.*`` (24x40, p=8), ``mae3.*`` (16x16, p=8, square):
  ``mask`` comes from the anchor's ``random_masking`` (1 = removed, the loss averages over those);
  ``loss = forward_loss(imgs, pred, mask)`` with ``norm_pix_loss=True``; ``pred_image =
  unpatchify(pred)`` (N, 3, H, W); ``grad_pred_image`` = gradient of
  ``forward_loss(imgs, patchify(pred_image), mask)`` w.r.t. ``pred_image``. The anchor's
  ``patchify``/``unpatchify`` only accept square images; for the non-square cases the image is
  zero-padded to a square patch grid, the anchor's ``patchify`` is run, and the patches of the
  real (h, w) grid are kept in row-major order (``unpatchify``: the inverse, crop after). On a
  square image that is exactly the anchor's function (``mae3`` has no padding at all).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SEED = 20240917

# sinkhorn: name -> (B, K, temp, n_iterations, logit scale)
SK_CASES = {"sk": (12, 40, 0.07, 3, 1.0), "sk2": (5, 7, 0.04, 5, 1.0)}
# center: name -> (B, K, temp)
CENTER_CASES = {"center": (6, 16, 0.05)}
# dino: name -> (S, T, B, K, student_temp)
DINO_CASES = {"dino": (4, 2, 3, 32, 0.1), "dino2": (2, 2, 3, 32, 0.1)}
# mae: name -> (N, H, W, patch, mask_ratio)
MAE_CASES = {"mae": (3, 64, 48, 16, 0.75), "mae2": (2, 24, 40, 8, 0.5), "mae3": (2, 16, 16, 8, 0.75)}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _git_commit(root: str) -> str:
    """HEAD of ``root`` if it is itself a git work tree (not merely inside one), else "unknown"."""
    try:
        top, head = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel", "HEAD"],
                                   capture_output=True, text=True, check=True).stdout.split()
        return head if os.path.samefile(top, root) else "unknown"
    except Exception:
        return "unknown"


def _import_by_path(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_dino_loss(root: str):
    path = os.path.join(root, "dinov3", "loss", "dino_clstoken_loss.py")
    sys.path.insert(0, root)
    try:
        import dinov3.distributed  # noqa: F401
    except Exception:
        stub = types.ModuleType("dinov3.distributed")

        def _never(*args, **kwargs):
            raise RuntimeError("dinov3.distributed stub: torch.distributed is not initialised here")

        stub.get_process_subgroup = _never
        stub.get_subgroup_size = _never
        sys.modules["dinov3.distributed"] = stub
    return _import_by_path("anchor_dino_clstoken_loss", path).DINOLoss, path


def load_mae(root: str):
    path = os.path.join(root, "models_mae.py")
    try:
        from timm.models.vision_transformer import Block, PatchEmbed  # noqa: F401
    except Exception:
        for name in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[name]

        class _Placeholder:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("timm stub: no model is built by this script")

        timm = types.ModuleType("timm")
        models = types.ModuleType("timm.models")
        vit = types.ModuleType("timm.models.vision_transformer")
        vit.PatchEmbed = type("PatchEmbed", (_Placeholder,), {})
        vit.Block = type("Block", (_Placeholder,), {})
        timm.models, models.vision_transformer = models, vit
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vit})
    sys.path.insert(0, root)  # models_mae imports util.pos_embed from the repo root
    return _import_by_path("anchor_models_mae", path).MaskedAutoencoderViT, path


def make_sinkhorn(DINOLoss, out):
    for name, (B, K, temp, n_iters, scale) in SK_CASES.items():
        logits = torch.randn(B, K) * scale
        assert logits.abs().max().item() / temp < 80.0, "float32 exp would overflow in the anchor"
        res = DINOLoss(K).sinkhorn_knopp_teacher(logits.clone(), temp, n_iterations=n_iters)
        assert torch.isfinite(res).all()
        out[f"{name}.logits"] = logits
        out[f"{name}.temp"] = torch.tensor(temp, dtype=torch.float32)
        out[f"{name}.n_iters"] = torch.tensor(n_iters, dtype=torch.int64)
        out[f"{name}.out"] = res


def make_center(DINOLoss, out):
    for name, (B, K, temp) in CENTER_CASES.items():
        logits = torch.randn(B, K)
        center = torch.randn(1, K) * 0.5
        loss = DINOLoss(K)
        loss.center.copy_(center)
        res = loss.softmax_center_teacher(logits.clone(), temp, update_centers=False)
        assert torch.isfinite(res).all()
        out[f"{name}.logits"] = logits
        out[f"{name}.center"] = center
        out[f"{name}.temp"] = torch.tensor(temp, dtype=torch.float32)
        out[f"{name}.out"] = res


def make_dino(DINOLoss, out):
    for name, (S, T, B, K, student_temp) in DINO_CASES.items():
        student = torch.randn(S, B, K)
        teacher_probs = torch.softmax(torch.randn(T, B, K) * 2.0, dim=-1)
        loss_fn = DINOLoss(K, student_temp=student_temp)
        out[f"{name}.student"] = student
        out[f"{name}.teacher_probs"] = teacher_probs
        out[f"{name}.student_temp"] = torch.tensor(student_temp, dtype=torch.float32)
        for suffix, ignore_diagonal in (("", False), ("_nodiag", True)):
            leaf = student.clone().requires_grad_(True)
            loss = loss_fn(leaf, teacher_probs, ignore_diagonal=ignore_diagonal)
            (grad,) = torch.autograd.grad(loss, leaf)
            out[f"{name}.loss{suffix}"] = loss.detach()
            out[f"{name}.grad{suffix}"] = grad


class _MaeSelf:
    """Lightweight stand-in for a MaskedAutoencoderViT instance: only what the called methods read.

    The anchor's patchify/unpatchify take the patch size from ``self.patch_embed.patch_size[0]``
    and only handle square images, so a non-square (h, w) grid goes through them on the padded
    square (S, S) grid, S = max(h, w), keeping the patches with row < h and column < w.
    """

    def __init__(self, Mae, p: int, h: int, w: int):
        self.patch_embed = types.SimpleNamespace(patch_size=(p, p))
        self.norm_pix_loss = True
        self.p, self.h, self.w, self.s = p, h, w, max(h, w)
        self._patchify = functools.partial(Mae.patchify, self)
        self._unpatchify = functools.partial(Mae.unpatchify, self)
        self.random_masking = functools.partial(Mae.random_masking, self)
        self.forward_loss = functools.partial(Mae.forward_loss, self)
        self.idx = torch.tensor([i * self.s + j for i in range(h) for j in range(w)])

    def patchify(self, imgs):
        sp = self.s * self.p
        assert imgs.shape[2:] == (self.h * self.p, self.w * self.p)
        padded = F.pad(imgs, (0, sp - imgs.shape[3], 0, sp - imgs.shape[2]))
        return self._patchify(padded).index_select(1, self.idx)

    def unpatchify(self, x):
        full = x.new_zeros(x.shape[0], self.s * self.s, x.shape[2]).index_copy(1, self.idx, x)
        return self._unpatchify(full)[:, :, : self.h * self.p, : self.w * self.p]


def make_mae(Mae, out):
    for name, (N, H, W, p, mask_ratio) in MAE_CASES.items():
        h, w = H // p, W // p
        L = h * w
        me = _MaeSelf(Mae, p, h, w)
        imgs = torch.randn(N, 3, H, W)
        pred = torch.randn(N, L, p * p * 3)
        _, mask, _ = me.random_masking(torch.zeros(N, L, 1), mask_ratio)
        assert torch.all(mask.sum(1) == L - int(L * (1 - mask_ratio)))

        # padding sanity: on a NaN-padded image exactly the kept patches are NaN-free
        nan_pad = F.pad(imgs, (0, me.s * p - W, 0, me.s * p - H), value=float("nan"))
        sq = me._patchify(nan_pad)
        keep = torch.zeros(me.s * me.s, dtype=torch.bool)
        keep[me.idx] = True
        assert not torch.isnan(sq[:, keep]).any() and torch.isnan(sq[:, ~keep]).any(dim=-1).all()

        loss = me.forward_loss(imgs, pred, mask)
        pred_image = me.unpatchify(pred)
        assert torch.equal(me.patchify(pred_image), pred)
        leaf = pred_image.clone().requires_grad_(True)
        loss_img = me.forward_loss(imgs, me.patchify(leaf), mask)
        (grad,) = torch.autograd.grad(loss_img, leaf)
        assert torch.equal(loss_img.detach(), loss)
        if h == w:  # square: identical to calling the anchor's functions directly
            assert torch.equal(pred_image, me._unpatchify(pred))
            assert torch.equal(me.patchify(imgs), me._patchify(imgs))

        out[f"{name}.imgs"] = imgs
        out[f"{name}.patch"] = torch.tensor(p, dtype=torch.int64)
        out[f"{name}.pred"] = pred
        out[f"{name}.mask"] = mask
        out[f"{name}.loss"] = loss.detach()
        out[f"{name}.pred_image"] = pred_image
        out[f"{name}.grad_pred_image"] = grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dinov3", required=True, help="root of a facebookresearch/dinov3 work tree")
    ap.add_argument("--mae", required=True, help="root of a facebookresearch/mae work tree")
    ap.add_argument("--out", default="tests/fixtures/pretrain_parity.safetensors")
    ap.add_argument("--dinov3-commit", default=None, help="recorded in the metadata (default: git rev-parse)")
    ap.add_argument("--mae-commit", default=None, help="recorded in the metadata (default: git rev-parse)")
    args = ap.parse_args()

    dinov3_root, mae_root = os.path.abspath(args.dinov3), os.path.abspath(args.mae)
    DINOLoss, dino_path = load_dino_loss(dinov3_root)
    Mae, mae_path = load_mae(mae_root)

    torch.manual_seed(SEED)
    out: dict[str, torch.Tensor] = {}
    make_sinkhorn(DINOLoss, out)
    make_center(DINOLoss, out)
    make_dino(DINOLoss, out)
    make_mae(Mae, out)
    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        assert v.dtype == torch.int64 or torch.isfinite(v).all(), k
    out = {k: v.detach().contiguous() for k, v in sorted(out.items())}

    meta = {
        "generator": "scripts/make_pretrain_fixtures.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "dinov3_commit": args.dinov3_commit or _git_commit(dinov3_root),
        "dinov3_file": "dinov3/loss/dino_clstoken_loss.py",
        "dinov3_sha256": _sha256(dino_path),
        "mae_commit": args.mae_commit or _git_commit(mae_root),
        "mae_file": "models_mae.py",
        "mae_sha256": _sha256(mae_path),
        "scalars": "0-d tensors: *.temp/*.student_temp float32, *.n_iters/*.patch int64",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # one key: safetensors writes metadata keys in hash order, a single JSON string keeps the bytes stable
    save_file(out, args.out, metadata={"provenance": json.dumps(meta, sort_keys=True)})
    print(f"wrote {args.out}: {len(out)} tensors, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
