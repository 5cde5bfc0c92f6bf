"""Regenerate the task-head parity fixtures ``tests/fixtures/heads_<task>.safetensors``.

The official code is not part of this repository. Point this script at an official Sapiens2
checkout (the directory holding ``sapiens/``)::

    python scripts/make_head_fixtures.py /path/to/sapiens2-checkout [--commit <sha>]

A checkout can be made from a bare mirror with
``git -C <mirror> archive HEAD sapiens | tar -x -C <dir>`` (then pass ``--commit``, since the
archive has no ``.git``).

Only the five head modules are imported, by file path; the framework pieces they import at module
level (``sapiens.registry``, the pose evaluator) are replaced by tiny stand-ins in ``sys.modules``.
Loss modules are built through the stand-in registry as parameter-free placeholders: the official
losses hold no parameters or buffers, so they never appear in a ``state_dict``.

For each task the fixture holds:

* ``model.<key>``: the official head's ``state_dict()`` at a small width (same layer structure as
  the released configs), every parameter and floating buffer set to seeded random values;
* ``input``: one random feature map, batch 2;
* ``output`` (pointmap: ``output.pointmap`` and ``output.scale``): the official float32 forward in
  eval mode, and ``<name>.exact``: the same module and input in float64, a machine-independent
  reference;
* metadata: ``kwargs`` (constructor kwargs, JSON), ``official_file``, ``official_sha256``,
  ``official_commit``, ``seed``, and from the official per-arch configs ``arch_kwargs`` (the
  ``decode_head`` kwargs without ``type`` / ``loss_decode``), ``arch_shapes`` (the official head's
  ``state_dict`` key -> shape at full size, built on the meta device) and ``config_sha256``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import torch
from torch import nn
from safetensors.torch import save_file

ARCHS = ("0.4b", "0.8b", "1b", "5b")

# task -> (file under the checkout, dotted module name, class name, config glob with {arch})
OFFICIAL = {
    "pose": (
        "sapiens/pose/src/models/heads/pose_heatmap_head.py",
        "sapiens.pose.src.models.heads.pose_heatmap_head",
        "PoseHeatmapHead",
        "sapiens/pose/configs/keypoints308/shutterstock_goliath_3po/sapiens2_{arch}_*.py",
    ),
    "seg": (
        "sapiens/dense/src/models/heads/seg_head.py",
        "sapiens.dense.src.models.heads.seg_head",
        "SegHead",
        "sapiens/dense/configs/seg/*/sapiens2_{arch}_*.py",
    ),
    "normal": (
        "sapiens/dense/src/models/heads/normal_head.py",
        "sapiens.dense.src.models.heads.normal_head",
        "NormalHead",
        "sapiens/dense/configs/normal/*/sapiens2_{arch}_*.py",
    ),
    "pointmap": (
        "sapiens/dense/src/models/heads/pointmap_head.py",
        "sapiens.dense.src.models.heads.pointmap_head",
        "PointmapHead",
        "sapiens/dense/configs/pointmap/*/sapiens2_{arch}_*.py",
    ),
    "albedo": (
        "sapiens/dense/src/models/heads/albedo_head.py",
        "sapiens.dense.src.models.heads.albedo_head",
        "AlbedoHead",
        "sapiens/dense/configs/albedo/*/sapiens2_{arch}_*.py",
    ),
}

# Small heads with the released layer structure (pose: exactly the 1b layout; seg: four transposed
# convs like every release, but mixing kernel sizes 4/3/2 to cover all padding rules, and a 3x3
# conv; dense heads: four PixelShuffle blocks and three 3x3 convs as released). Input (h, w) is the
# feature map; pointmap's needs h >= 9 so the three stride-2 scale convs leave more than one
# spatial element for InstanceNorm.
SMALL = {
    "pose": (
        dict(in_channels=32, out_channels=17, deconv_out_channels=[24, 16], deconv_kernel_sizes=[4, 4],
             conv_out_channels=[16, 12, 8], conv_kernel_sizes=[1, 1, 1]),
        (6, 5),
    ),
    "seg": (
        dict(in_channels=32, deconv_out_channels=[24, 16, 12, 8], deconv_kernel_sizes=[4, 3, 2, 4],
             conv_out_channels=[8, 8], conv_kernel_sizes=[1, 3], num_classes=5),
        (3, 3),
    ),
    "normal": (
        dict(in_channels=16, upsample_channels=[16, 12, 8, 8], conv_out_channels=[8, 8, 8], conv_kernel_sizes=[3, 3, 3]),
        (4, 3),
    ),
    "albedo": (
        dict(in_channels=16, upsample_channels=[16, 12, 8, 8], conv_out_channels=[8, 8, 8], conv_kernel_sizes=[3, 3, 3]),
        (4, 3),
    ),
    "pointmap": (
        # 9x2 -> scale convs 5x1, 3x1, 2x1 -> 8 * 2 = 16 features; one 3x3 scale conv covers its padding
        dict(in_channels=16, upsample_channels=[16, 12, 8, 8], conv_out_channels=[8, 6, 4], conv_kernel_sizes=[3, 3, 3],
             scale_conv_out_channels=[12, 8, 8], scale_conv_kernel_sizes=[1, 3, 1], scale_final_layer=[16, 12, 6, 1]),
        (9, 2),
    ),
}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def install_stubs() -> None:
    """Stand-ins for the framework modules the head files import at module level."""

    class _Registry(dict):
        def register_module(self, *args, **kwargs):
            if args and callable(args[0]):
                return args[0]
            return lambda cls: cls

        def build(self, cfg, *args, **kwargs):
            # The heads build their losses here; a parameter-free placeholder keeps state_dict exact.
            return nn.Identity()

    def package(name: str) -> types.ModuleType:
        mod = sys.modules.get(name)
        if mod is None:
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so relative imports resolve
            sys.modules[name] = mod
        return mod

    for name in ("sapiens", "sapiens.pose", "sapiens.pose.src", "sapiens.pose.src.models",
                 "sapiens.pose.src.models.heads", "sapiens.pose.src.evaluators", "sapiens.dense",
                 "sapiens.dense.src", "sapiens.dense.src.models", "sapiens.dense.src.models.heads"):
        package(name)
    registry = types.ModuleType("sapiens.registry")
    registry.MODELS = _Registry()
    sys.modules["sapiens.registry"] = registry
    evaluator = types.ModuleType("sapiens.pose.src.evaluators.keypoints308_evaluator")
    evaluator.pose_pck_accuracy = lambda *a, **k: (None, 0.0, None)  # only used by the loss
    sys.modules[evaluator.__name__] = evaluator


def load_class(root: str, rel: str, module_name: str, cls: str):
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(root, rel))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return getattr(mod, cls)


def config_head_kwargs(path: str) -> dict:
    """The ``decode_head`` kwargs of an official config, without ``type`` and ``loss_decode``.

    The config is never executed: its top-level assignments are evaluated one by one as plain
    expressions (no builtins beyond ``dict``/``tuple``/``list``), skipping any that need more, and
    the ``decode_head`` call is then evaluated in that namespace with ``loss_decode`` removed.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    env = {"__builtins__": {}, "dict": dict, "tuple": tuple, "list": list, "int": int}

    def evaluate(node):
        return eval(compile(ast.Expression(node), path, "eval"), env)

    head = None
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
            continue
        if node.targets[0].id == "model":
            for kw in node.value.keywords:
                if kw.arg == "decode_head":
                    head = kw.value
            continue
        try:
            value = evaluate(node.value)
        except Exception:
            continue
        for t in node.targets:
            env[t.id] = value
    if head is None:
        raise RuntimeError(f"{path}: no model.decode_head")
    head.keywords = [kw for kw in head.keywords if kw.arg != "loss_decode"]
    kwargs = evaluate(head)
    kwargs.pop("type")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


# The heads' final 1x1 convs. Their weights are drawn 4x smaller: float32 rounding accumulated
# through a dozen conv/norm layers is ~1e-6 relative, and a smaller output keeps the absolute
# float32-vs-float32 difference between two machines well inside the tests' 1e-5.
OUTPUT_LAYERS = ("conv_pose", "conv_seg", "conv_normal", "conv_albedo", "conv_pointmap")


@torch.no_grad()
def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Seeded values large enough that every path matters; outputs stay O(1)."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        gain = 0.25 if name.split(".")[0] in OUTPUT_LAYERS else 1.0
        if leaf == "bias":
            p.copy_(0.2 * gain * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:  # norm scales
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            out_dim = 1 if isinstance(owner, nn.ConvTranspose2d) else 0
            fan_in = p.numel() // p.shape[out_dim]
            p.copy_(gain * torch.randn(p.shape, generator=gen) / fan_in**0.5)
    for name, b in module.named_buffers():
        if not b.is_floating_point():
            continue
        if name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))
        else:
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def shape_table(module: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def make(task: str, root: str, out_dir: str, commit: str, seed: int) -> str:
    rel, module_name, cls_name, config_glob = OFFICIAL[task]
    Official = load_class(root, rel, module_name, cls_name)

    arch_kwargs, arch_shapes, config_sha = {}, {}, {}
    for arch in ARCHS:
        paths = sorted(glob.glob(os.path.join(root, config_glob.format(arch=arch))))
        if len(paths) != 1:
            raise RuntimeError(f"expected one {task} config for {arch}, found {paths}")
        kwargs = config_head_kwargs(paths[0])
        arch_kwargs[f"sapiens2_{arch}"] = kwargs
        config_sha[os.path.relpath(paths[0], root)] = sha256(paths[0])
        with torch.device("meta"):
            arch_shapes[f"sapiens2_{arch}"] = shape_table(Official(**kwargs))

    kwargs, (h, w) = SMALL[task]
    gen = torch.Generator().manual_seed(seed)
    model = Official(**kwargs).eval()
    randomize(model, gen)
    x = torch.randn((2, kwargs["in_channels"], h, w), generator=gen)

    with torch.no_grad():
        out32 = model(x)
        sd = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        out64 = model.double()(x.double())
    names = ("output.pointmap", "output.scale") if task == "pointmap" else ("output",)
    if task != "pointmap":
        out32, out64 = (out32,), (out64,)
    tensors = dict(sd, input=x.contiguous())
    for name, a, b in zip(names, out32, out64):
        tensors[name] = a.contiguous()
        tensors[f"{name}.exact"] = b.contiguous()

    meta = {
        "task": task,
        "official_class": cls_name,
        "kwargs": json.dumps(kwargs),
        "official_file": rel,
        "official_sha256": sha256(os.path.join(root, rel)),
        "official_commit": commit,
        "seed": str(seed),
        "arch_kwargs": json.dumps(arch_kwargs),
        "arch_shapes": json.dumps(arch_shapes),
        "config_sha256": json.dumps(config_sha),
        "generator": "scripts/make_head_fixtures.py",
    }
    path = os.path.join(out_dir, f"heads_{task}.safetensors")
    save_file(tensors, path, metadata=meta)
    shapes = ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in names)
    print(f"wrote {path}: {len(sd)} tensors in the state dict, input {tuple(x.shape)}, {shapes}, "
          f"{os.path.getsize(path) / 1024:.0f} KiB")
    return path


def git_commit(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("official", help="official sapiens2 checkout (the directory containing sapiens/)")
    ap.add_argument("--commit", help="official git commit (default: git rev-parse HEAD in the checkout)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(OFFICIAL), choices=list(OFFICIAL))
    args = ap.parse_args()

    root = os.path.abspath(args.official)
    if not os.path.isdir(os.path.join(root, "sapiens")):
        ap.error(f"{root} has no sapiens/ directory")
    commit = args.commit or git_commit(root)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    install_stubs()
    os.makedirs(args.out, exist_ok=True)
    for i, task in enumerate(args.tasks):
        make(task, root, args.out, commit, args.seed + i)


if __name__ == "__main__":
    main()
