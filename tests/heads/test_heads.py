"""Task heads: parity with the official heads (fixtures from scripts/make_head_fixtures.py), the
per-arch configs, output shapes, custom class counts and input validation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from sapiens2.heads import (
    ARCHS,
    EMBED_DIMS,
    HEADS,
    TASKS,
    MattingHead,
    NormalHead,
    PointmapHead,
    PoseHeatmapHead,
    SegHead,
    build_head,
    head_config,
)
from sapiens2.heads.configs import FEATURE_SIZE, HEATMAP_SIZE, IMAGE_SIZE

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
OFFICIAL_TASKS = ("pose", "seg", "normal", "pointmap", "albedo")
OUTPUT_NAMES = {"pointmap": ("output.pointmap", "output.scale")}


def load_fixture(task):
    path = os.path.join(FIXTURES, f"heads_{task}.safetensors")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: run scripts/make_head_fixtures.py")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def listify(kwargs):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


# ----------------------------------------------------------------------------- official parity


@pytest.mark.parametrize("task", OFFICIAL_TASKS)
def test_official_parity(task):
    tensors, meta = load_fixture(task)
    assert meta["task"] == task
    kwargs = json.loads(meta["kwargs"])
    head = HEADS[task](**kwargs).eval()
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    # same key set and shapes as the official module, and a strict load
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    head.load_state_dict(sd, strict=True)

    names = OUTPUT_NAMES.get(task, ("output",))
    x = tensors["input"]
    with torch.no_grad():
        out32 = as_tuple(head(x))
        out64 = as_tuple(head.double()(x.double()))
    assert len(out32) == len(names)
    for name, a, b in zip(names, out32, out64):
        ref, exact = tensors[name], tensors[f"{name}.exact"]
        assert a.dtype == torch.float32 and a.shape == ref.shape
        err32 = (a - ref).abs().max().item()
        assert err32 <= 1e-5, f"{task} {name}: float32 max abs err {err32:.3g} vs the official float32 output"
        # float64 against float64: independent of the machine's float32 kernels
        err64 = (b - exact).abs().max().item()
        assert err64 <= 1e-9, f"{task} {name}: float64 max abs err {err64:.3g}"
        assert exact.abs().max() > 0.1  # the reference is not degenerate


@pytest.mark.parametrize("task", OFFICIAL_TASKS)
def test_arch_configs_match_official(task):
    """configs.py holds exactly the official configs' decode_head kwargs, and the heads built from
    it have the official full-size state_dict key names and shapes (built on the meta device)."""
    _, meta = load_fixture(task)
    arch_kwargs, arch_shapes = json.loads(meta["arch_kwargs"]), json.loads(meta["arch_shapes"])
    assert sorted(arch_kwargs) == sorted(ARCHS)
    for arch in ARCHS:
        assert listify(head_config(task, arch)) == arch_kwargs[arch], arch
        with torch.device("meta"):
            head = build_head(task, arch)
        assert {k: list(v.shape) for k, v in head.state_dict().items()} == arch_shapes[arch], arch
        official_params = sum(math.prod(s) for s in arch_shapes[arch].values())
        assert sum(p.numel() for p in head.parameters()) == official_params


# ----------------------------------------------------------------------------- per-arch configs


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def expected_params(task, cfg):
    """Closed-form parameter count from the hyper-parameters (independent of the module code)."""
    C = cfg["in_channels"]
    if task in ("pose", "seg"):
        n, c = 0, C
        for ch, k in zip(cfg["deconv_out_channels"], cfg["deconv_kernel_sizes"]):
            n, c = n + _conv(c, ch, k, bias=False), ch
        for ch, k in zip(cfg["conv_out_channels"], cfg["conv_kernel_sizes"]):
            n, c = n + _conv(c, ch, k), ch
        return n + _conv(c, cfg["out_channels"] if task == "pose" else cfg["num_classes"], 1)
    n, c = _conv(C, C, 3), C
    for ch in cfg["upsample_channels"]:
        n, c = n + _conv(c, 4 * ch, 3), ch
    for ch, k in zip(cfg["conv_out_channels"], cfg["conv_kernel_sizes"]):
        n, c = n + _conv(c, ch, k), ch
    n += _conv(c, 1 if task == "matting" else 3, 1)
    if task == "albedo":  # one RMSNorm scale per normalised channel
        n += C + sum(cfg["upsample_channels"]) + sum(cfg["conv_out_channels"])
    if task == "pointmap":
        c = C
        for ch, k in zip(cfg["scale_conv_out_channels"], cfg["scale_conv_kernel_sizes"]):
            n, c = n + _conv(c, ch, k), ch
        widths = cfg["scale_final_layer"]
        n += sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    return n


def test_arch_configs_build_on_meta():
    rows = []
    for task in TASKS:
        for arch in ARCHS:
            cfg = head_config(task, arch)
            assert cfg["in_channels"] == EMBED_DIMS[arch]
            with torch.device("meta"):
                head = build_head(task, arch)
            assert all(p.is_meta for p in head.parameters())
            n = sum(p.numel() for p in head.parameters())
            assert n == expected_params(task, cfg), (task, arch)
            rows.append(f"{task:9s} {arch:14s} {n / 1e6:8.2f}M")
    print("\n" + "\n".join(rows))
    # arch prefix is optional; matting reuses the normal head's widths
    assert head_config("seg", "1b") == head_config("seg", "sapiens2_1b")
    for arch in ARCHS:
        assert head_config("matting", arch) == head_config("normal", arch)


def test_embed_dims_match_backbone_zoo():
    from sapiens2.models import get_arch

    for arch in ARCHS:
        assert get_arch(arch).embed_dims == EMBED_DIMS[arch]


# ----------------------------------------------------------------------------- output shapes


def small_kwargs(task, C=8):
    """Narrow heads with the released layer counts, cheap enough to run on CPU."""
    if task == "pose":
        return dict(in_channels=C, out_channels=5, deconv_out_channels=(8, 8), deconv_kernel_sizes=(4, 4),
                    conv_out_channels=(8, 8, 8), conv_kernel_sizes=(1, 1, 1))
    if task == "seg":
        return dict(in_channels=C, deconv_out_channels=(8, 4, 4, 4), deconv_kernel_sizes=(4, 4, 4, 4),
                    conv_out_channels=(4, 4), conv_kernel_sizes=(1, 1), num_classes=3)
    kw = dict(in_channels=C, upsample_channels=(8, 4, 4, 4), conv_out_channels=(4, 4, 4), conv_kernel_sizes=(3, 3, 3))
    if task == "pointmap":
        kw["scale_conv_out_channels"] = None  # the scale MLP pins the map size; tested separately
    return kw


def expected_shapes(task, B, h, w, cfg):
    if task == "pose":
        return [(B, cfg["out_channels"], 4 * h, 4 * w)]
    if task == "seg":
        return [(B, cfg["num_classes"], 16 * h, 16 * w)]
    if task == "pointmap":
        return [(B, 3, 16 * h, 16 * w), (B, 1)]
    return [(B, 1 if task == "matting" else 3, 16 * h, 16 * w)]


@pytest.mark.parametrize("task", TASKS)
def test_output_shapes_released_configs(task):
    """Released 1b head on a 1024x768 image's 64x48 feature map (meta device: shapes only)."""
    cfg = head_config(task, "1b")
    h, w = FEATURE_SIZE
    with torch.device("meta"):
        head = build_head(task, "1b")
        out = as_tuple(head(torch.empty(2, cfg["in_channels"], h, w)))
    assert [tuple(o.shape) for o in out] == expected_shapes(task, 2, h, w, cfg)
    if task == "pose":
        assert tuple(out[0].shape[-2:]) == HEATMAP_SIZE
    elif task != "pointmap":
        assert tuple(out[0].shape[-2:]) == IMAGE_SIZE


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("hw", [(1, 2), (4, 3), (5, 7), (64, 48)])
def test_output_shapes_sizes(task, hw):
    h, w = hw
    kw = small_kwargs(task)
    if hw == (64, 48):  # full-resolution outputs: shapes on meta, no compute
        with torch.device("meta"):
            head = HEADS[task](**kw)
            out = as_tuple(head(torch.empty(1, 8, h, w)))
        exp = expected_shapes(task, 1, h, w, {"out_channels": 5, "num_classes": 3})
        if task == "pointmap":
            exp = exp[:1]
        assert [tuple(o.shape) for o in out if o is not None] == exp
        return
    torch.manual_seed(0)
    head = HEADS[task](**kw).eval()
    x = torch.randn(2, 8, h, w)
    with torch.no_grad():
        out = as_tuple(head(x))
        out_list = as_tuple(head([x, torch.zeros(1)]))  # tuple/list input: first element is the map
    exp = expected_shapes(task, 2, h, w, {"out_channels": 5, "num_classes": 3})
    if task == "pointmap":
        assert out[1] is None
        out, out_list, exp = out[:1], out_list[:1], exp[:1]
    assert [tuple(o.shape) for o in out] == exp
    for a, b in zip(out, out_list):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pointmap_scale_branch_sizes():
    kw = dict(small_kwargs("pointmap"), scale_conv_out_channels=(8, 8, 4), scale_conv_kernel_sizes=(1, 1, 1))
    # the released formula: 64x48 map -> 8x6 after three halvings
    assert PointmapHead.scale_in_features((64, 48)) == head_config("pointmap", "1b")["scale_final_layer"][0] == 6144
    for h, w in [(9, 5), (16, 12)]:
        n = PointmapHead.scale_in_features((h, w), (8, 8, 4), (1, 1, 1))
        head = PointmapHead(**kw, scale_final_layer=(n, 16, 1)).eval()
        with torch.no_grad():
            pm, scale = head(torch.randn(2, 8, h, w))
        assert pm.shape == (2, 3, 16 * h, 16 * w) and scale.shape == (2, 1)
        with pytest.raises(ValueError, match="scale_final_layer"):
            head(torch.randn(2, 8, h + 8, w))


def test_fresh_init_follows_official_recipe():
    """Kaiming-normal (fan_out, ReLU gain) convs, zero biases, Kaiming (fan_in) linears; the seg
    head leaves its transposed convs at PyTorch's default (uniform) init, the pose head does not."""
    torch.manual_seed(0)
    pose = PoseHeatmapHead(64, 17, deconv_out_channels=(64,), deconv_kernel_sizes=(4,),
                           conv_out_channels=(64,), conv_kernel_sizes=(3,))
    seg = SegHead(64, deconv_out_channels=(64,), deconv_kernel_sizes=(4,))
    pm = PointmapHead(64, upsample_channels=(16,), scale_conv_out_channels=(32,), scale_conv_kernel_sizes=(1,),
                      scale_final_layer=(256, 128, 1))
    for m in (pose.conv_layers[0], pose.conv_pose, seg.conv_seg, pm.input_conv[0], pm.scale_final_layer[1]):
        assert (m.bias == 0).all()
    w = pose.conv_layers[0].weight  # fan_out = 64 * 9
    assert abs(w.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05
    w = pm.scale_final_layer[1].weight  # fan_in = 256, linear gain
    assert abs(w.std().item() / math.sqrt(1 / 256) - 1) < 0.05
    # ConvTranspose2d weight is (in, out, k, k): PyTorch's fan_out for it is in * k * k
    assert abs(pose.deconv_layers[0].weight.std().item() / math.sqrt(2 / (64 * 16)) - 1) < 0.05
    assert seg.deconv_layers[0].weight.abs().max() <= 1 / math.sqrt(64 * 16) + 1e-6  # default uniform bound


# ----------------------------------------------------------------------------- matting (ours)


def test_matting_alpha():
    torch.manual_seed(0)
    head = MattingHead(**small_kwargs("matting")).eval()
    with torch.no_grad():
        x = 5 * torch.randn(2, 8, 4, 3)
        alpha, logits = head(x), head.logits(x)
    assert alpha.shape == (2, 1, 64, 48)
    assert alpha.min() >= 0 and alpha.max() <= 1
    torch.testing.assert_close(alpha, torch.sigmoid(logits))
    # fresh head: zero output bias -> the logits are centred, not saturated
    assert logits.abs().mean() < 5
    assert MattingHead.postprocess(alpha, (100, 75)).shape == (2, 1, 100, 75)


def test_matting_other_upsample_count_still_input_resolution():
    head = MattingHead(in_channels=8, upsample_channels=(8, 4, 4), conv_out_channels=None, conv_kernel_sizes=None).eval()
    with torch.no_grad():
        alpha = head(torch.randn(1, 8, 3, 5))
    assert alpha.shape == (1, 1, 48, 80) and 0 <= alpha.min() and alpha.max() <= 1


def test_matting_warm_start_from_normal_head():
    kw = small_kwargs("normal")
    normal = NormalHead(**kw)
    matting = MattingHead(**kw)
    matting.load_trunk(normal.state_dict())
    for k, v in normal.state_dict().items():
        if not k.startswith("conv_normal."):
            torch.testing.assert_close(matting.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        matting.load_trunk({k: v for k, v in normal.state_dict().items() if not k.startswith("input_conv.")})


# ----------------------------------------------------------------------------- custom counts


def test_custom_class_and_keypoint_counts():
    seg = build_head("seg", "1b", in_channels=8, num_classes=7, deconv_out_channels=(4, 4, 4, 4),
                     conv_out_channels=(4, 4))
    assert seg.conv_seg.weight.shape == (7, 4, 1, 1)
    with torch.no_grad():
        assert seg.eval()(torch.randn(1, 8, 2, 2)).shape == (1, 7, 32, 32)
    with torch.device("meta"):
        pose = build_head("pose", "1b", out_channels=17)
        seg = build_head("seg", "5b", num_classes=2)
    assert pose.conv_pose.weight.shape == (17, 256, 1, 1)
    assert seg.conv_seg.weight.shape == (2, 64, 1, 1)
    pose = build_head("pose", in_channels=8, out_channels=133, deconv_out_channels=(4,), deconv_kernel_sizes=(2,))
    with torch.no_grad():
        assert pose.eval()(torch.randn(1, 8, 3, 2)).shape == (1, 133, 6, 4)


def test_defaults_match_official_constructor_defaults():
    # arch=None: the official constructors' own defaults
    with torch.device("meta"):
        seg, normal, pm = build_head("seg"), build_head("normal"), build_head("pointmap")
    assert seg.conv_seg.weight.shape == (29, 256, 1, 1) and seg.in_channels == 768
    assert normal.conv_normal.weight.shape == (3, 96, 1, 1)
    assert pm.scale_final_layer[1].in_features == 48 * 128 and pm.scale_final_layer[-1].out_features == 1


# ----------------------------------------------------------------------------- postprocess


def test_pose_decode():
    hm = torch.zeros(2, 3, 8, 6)
    hm[0, 0, 2, 5] = 0.9  # (x=5, y=2)
    hm[0, 1, 7, 0] = 0.5
    hm[1, 2, 0, 0] = 1.0
    hm[0, 2] = -1.0  # no positive response -> -1 location
    kpts, scores = PoseHeatmapHead.decode(hm, (32, 24))
    assert kpts.shape == (2, 3, 2) and scores.shape == (2, 3)
    # UDP: x_hm / (W - 1) * W_in
    torch.testing.assert_close(kpts[0, 0], torch.tensor([5 / 5 * 24, 2 / 7 * 32]))
    torch.testing.assert_close(kpts[0, 1], torch.tensor([0.0, 32.0]))
    torch.testing.assert_close(kpts[0, 2], torch.tensor([-24 / 5, -32 / 7]))
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.5, -1.0]))


def test_dense_postprocess():
    seg_logits = torch.zeros(1, 3, 4, 4)
    seg_logits[:, 2] = 1.0
    labels = SegHead.postprocess(seg_logits, (16, 12))
    assert labels.shape == (1, 16, 12) and labels.dtype == torch.int64 and (labels == 2).all()

    n = NormalHead.postprocess(torch.randn(2, 3, 8, 6))
    torch.testing.assert_close(n.norm(dim=1), torch.ones(2, 8, 6))
    assert NormalHead.postprocess(torch.randn(2, 3, 8, 6), (16, 12)).shape == (2, 3, 16, 12)

    pm, scale = torch.randn(2, 3, 4, 4), torch.tensor([[2.0], [0.5]])
    metric = PointmapHead.postprocess(pm, scale)
    torch.testing.assert_close(metric, pm / scale.view(2, 1, 1, 1))
    assert PointmapHead.postprocess(pm, scale, (8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        PointmapHead.postprocess(pm, torch.ones(3, 1))


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("task", TASKS)
def test_bad_feature_maps(task):
    head = HEADS[task](**small_kwargs(task))
    with pytest.raises(ValueError, match=r"x has 4 channels.*in_channels=8"):
        head(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        head(torch.randn(8, 3, 3))
    with pytest.raises(TypeError, match=r"x must be a Tensor"):
        head("features")
    with pytest.raises(ValueError, match=r"x is an empty"):
        head([])


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="deconv_out_channels and deconv_kernel_sizes"):
        PoseHeatmapHead(8, 5, deconv_out_channels=(8, 8), deconv_kernel_sizes=(4,))
    with pytest.raises(ValueError, match="deconv_kernel_sizes entries"):
        SegHead(8, deconv_out_channels=(8,), deconv_kernel_sizes=(5,))
    with pytest.raises(ValueError, match="conv_out_channels and conv_kernel_sizes"):
        NormalHead(8, upsample_channels=(4,), conv_out_channels=(4, 4), conv_kernel_sizes=None)
    with pytest.raises(ValueError, match="num_classes"):
        SegHead(8, num_classes=0)
    with pytest.raises(TypeError, match="in_channels"):
        PoseHeatmapHead((8, 8), 5)
    with pytest.raises(TypeError, match="upsample_channels"):
        NormalHead(8, upsample_channels=8)
    with pytest.raises(ValueError, match="scale_final_layer"):
        PointmapHead(8, upsample_channels=(4,), scale_final_layer=(16,))
    with pytest.raises(ValueError, match="unknown task"):
        build_head("depth", "1b")
    with pytest.raises(ValueError, match="arch"):
        build_head("seg", "sapiens2_0.1b")
    with pytest.raises(TypeError, match="out_channels"):
        build_head("pose")
