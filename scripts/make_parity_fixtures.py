"""Regenerate the parity fixtures in tests/fixtures/ from the official Sapiens2 code.

The official code is not part of this repository. Point this script at the official standalone
backbone file (facebookresearch/sapiens2, ``sapiens/backbones/standalone/sapiens2.py``)::

    python scripts/make_parity_fixtures.py /path/to/sapiens2.py

For each tiny config it builds the official module as it is (float32, never cast), gives every
parameter random values large enough that every path matters, runs one input, and stores the
weights (``model.*``), the input and the official raw outputs with bf16 RoPE (the official
default) and fp32 RoPE, as safetensors, and ``output.exact``: the same official module and input in
float64 throughout (RoPE included), the reference the tests measure both against. Float32 results
depend on the machine's GEMM kernels (summation order), so the tests apply the tolerance rule to
``output.exact`` instead of asking for equal bits.

The real-width configs (the 0.1B and 0.4B widths with a few layers, one of them GQA through the
official ``layer_cfgs``, and the 4K tokenizer at width 768) would need tens of MB of weights: their
weights and input come from seeds (``tests/parity_weights.py``, numpy's frozen stream, shared with
the tests) and the fixture stores the parameter list, the seeds, the RoPE periods buffer and the
outputs only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
from safetensors.torch import save_file

# name -> (official arch_zoo entry, constructor kwargs, image (H, W))
CONFIGS = {
    # more than 16 layers, so the official layout has GQA layers (8 .. L-9)
    "tiny_gqa": (
        dict(embed_dims=32, num_layers=18, num_heads=2, feedforward_channels=128, num_tokenizer_layers=2),
        dict(use_tokenizer=False),
        (96, 64),
    ),
    # the 4K form: window tokenizer in front of the trunk
    "tiny_tokenizer": (
        dict(embed_dims=32, num_layers=3, num_heads=2, feedforward_channels=128, num_tokenizer_layers=2),
        dict(use_tokenizer=True),
        (128, 192),
    ),
}


# real widths: name -> (arch_zoo entry, kwargs, image, layers that are GQA via layer_cfgs)
SEEDED = {
    "w768_gqa": (dict(embed_dims=768, num_layers=3, num_heads=12, feedforward_channels=768 * 4,
                      num_tokenizer_layers=2), dict(use_tokenizer=False), (128, 96), (1,)),
    "w1024_gqa": (dict(embed_dims=1024, num_layers=3, num_heads=16, feedforward_channels=1024 * 4,
                       num_tokenizer_layers=2), dict(use_tokenizer=False), (128, 96), (1,)),
    "w768_tokenizer": (dict(embed_dims=768, num_layers=3, num_heads=12, feedforward_channels=768 * 4,
                            num_tokenizer_layers=2), dict(use_tokenizer=True), (256, 192), (1,)),
}


@torch.no_grad()
def official_exact(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official module's raw output in float64 throughout: its RoPE computes in ``self.dtype``
    (not the buffer's dtype), so that is raised to float64 too. ``model`` is left in float64."""
    model.double()
    model.rope_embed.dtype = torch.float64
    return model(x.double())[0].contiguous()


def make_seeded(Official, name, zoo, kwargs, img, gqa_layers, out_dir, seed):
    import json

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from parity_weights import image, weights

    Official.arch_zoo[name] = zoo
    H = zoo["num_heads"]
    layer_cfgs = [{"num_kv_heads": H // 2} if i in gqa_layers else {} for i in range(zoo["num_layers"])]
    outputs, names, periods = {}, None, None
    x = image((2, 3, *img), seed + 1)
    for rope in ("bf16", "fp32"):
        torch.manual_seed(0)
        model = Official(arch=name, img_size=img, pos_embed_rope_dtype=rope, layer_cfgs=layer_cfgs, **kwargs).eval()
        sd = model.state_dict()
        if names is None:
            names = [(k, list(v.shape)) for k, v in sd.items() if k != "rope_embed.periods"]
            periods = sd["rope_embed.periods"]
        w = weights(names, seed)
        w["rope_embed.periods"] = periods  # the bf16 run's buffer, as a checkpoint carries it
        model.load_state_dict(w)
        with torch.no_grad():
            outputs[f"output.rope_{rope}"] = model(x)[0].contiguous()
        if rope == "fp32":
            outputs["output.exact"] = official_exact(model, x)
    path = os.path.join(out_dir, f"parity_{name}.safetensors")
    meta = {"arch": repr(zoo), "kwargs": repr(kwargs), "img_size": repr(img), "gqa_layers": repr(gqa_layers),
            "params": json.dumps(names), "weight_seed": str(seed), "image_seed": str(seed + 1)}
    save_file({"rope_embed.periods": periods.contiguous(), **outputs}, path, metadata=meta)
    print(f"wrote {path}: {len(names)} seeded parameters, output {tuple(outputs['output.rope_bf16'].shape)}")


def load_official(path: str):
    spec = importlib.util.spec_from_file_location("official_sapiens2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Sapiens2


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ln1.weight", "ln2.weight", "norm.weight")):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("gamma.weight"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("official", help="path to the official sapiens/backbones/standalone/sapiens2.py")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = ap.parse_args()
    Official = load_official(args.official)
    os.makedirs(args.out, exist_ok=True)
    for i, (name, (zoo, kwargs, img, gqa)) in enumerate(SEEDED.items()):
        make_seeded(Official, name, zoo, kwargs, img, gqa, args.out, seed=300 + 2 * i)
    for i, (name, (zoo, kwargs, img)) in enumerate(CONFIGS.items()):
        Official.arch_zoo[name] = zoo  # a custom size, added the way the zoo defines sizes
        outputs = {}
        for rope in ("bf16", "fp32"):
            torch.manual_seed(0)
            model = Official(arch=name, img_size=img, pos_embed_rope_dtype=rope, **kwargs).eval()
            if rope == "bf16":
                randomise(model, seed=100 + i)
            else:  # the same weights, the checkpoint's bf16 ``periods`` buffer included
                model.load_state_dict({k[len("model."):]: v for k, v in weights.items()})
            x = torch.randn(2, 3, *img, generator=torch.Generator().manual_seed(200 + i))
            with torch.no_grad():
                outputs[f"output.rope_{rope}"] = model(x)[0].contiguous()
            if rope == "fp32":
                outputs["output.exact"] = official_exact(model, x)
            if rope == "bf16":
                weights = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors = {**weights, "input": x, **outputs}
        path = os.path.join(args.out, f"parity_{name}.safetensors")
        meta = {"arch": repr(zoo), "kwargs": repr(kwargs), "img_size": repr(img)}
        save_file(tensors, path, metadata=meta)
        print(f"wrote {path}: {sum(v.numel() for k, v in weights.items())} weights, output {tuple(outputs['output.rope_bf16'].shape)}")


if __name__ == "__main__":
    main()
