"""``sapiens2 bench cost --stage pretrain``: one pretraining step (MAE + [CLS] self-distillation) per
image, ours vs the same recipe assembled from the newest official backbone and plain PyTorch losses,
counted by the rules of ``cost.py`` (bf16, meta device, batch 1 image by default).

The step (``sapiens2.pretrain``'s zoo recipe): 2 global views (1024x768, 75% of their patches
masked) and 8 local views (512x384, unmasked) per image; the EMA teacher runs its backbone and DINO
head on the 2 *unmasked* globals without grad; the student runs its backbone on every view, the MAE
decoder (width 512, depth 8, 16 heads) on the globals' tokens, the DINO head (65536 prototypes,
hidden 2048, bottleneck 256) on every view's [CLS], then the joint loss (normalised-pixel MSE +
Sinkhorn-Knopp targets and the DINO cross-entropies), and the backward of all of it.

**Ours**: ``PretrainStudent`` / ``PretrainTeacher`` / ``joint_loss`` exactly as the trainer calls
them (visible patches embedded only; all 10 views packed into one trunk pass; fused ops).

**Baseline** ("the same recipe assembled from the newest official backbone and plain PyTorch
losses"):

* backbone: the official op sequence — full patch conv, ``flatten(2).transpose(1, 2)``, the [CLS]
  and register tokens concatenated in front, RoPE tables computed per call (bf16, the official
  default), a stack of ``OfficialStyleBlock(gpu_like=True)`` built from our blocks
  (``from_ours``: same shapes), final ``nn.RMSNorm``;
* masking as an MAE on that backbone does it: the full patch conv, then ``torch.gather`` of the
  visible tokens (and of their RoPE rows); no packing: the masked globals and the locals go through
  the backbone as two separate calls (one per view group), the teacher's unmasked globals as a third;
* MAE decoder from official-style blocks (without LayerScale, as MAE's and ours): ``decoder_embed``,
  mask tokens concatenated and put in place with ``torch.gather`` by ``ids_restore`` (MAE's
  unshuffle), 2D RoPE over the full grid, final ``nn.RMSNorm``, ``decoder_pred`` giving patch
  pixels (MAE's layout, no unpatchify);
* DINO head: plain ``nn.Linear``/``nn.GELU`` MLP, ``F.normalize``, bias-free prototype layer, run
  once on the concatenated [CLS] tokens (DINOv2/v3 do the same);
* losses: MAE's ``forward_loss`` (patchify, per-patch normalisation, masked MSE; the mask built from
  ``ids_restore`` as MAE's ``random_masking`` does) and DINOv3's Sinkhorn-Knopp + cross-entropy
  (``log_softmax`` + ``einsum``): ``sapiens2.pretrain.dino``'s functions are that plain PyTorch
  code already, so both sides call them.

Where a plain-PyTorch choice was open, the cheaper one is taken (``expand`` instead of MAE's
``repeat`` for gather indices and mask tokens; ``decoder_pred`` on the patch rows only).

Both sides: the student's forward + backward with ``measure(train=True)`` (gradients of every
parameter; random output gradient for the loss, made outside the counter), the teacher's forward
with ``measure(train=False)``; the step is their sum (kept bytes: the student's; the teacher's
no-grad forward keeps nothing). The masks and crops are inputs (made by the data side on both).
Not in the step: the optimizer update and the EMA (once per optimizer step, sharded over GPUs).

FLOPs are reported twice: **executed** (the cost counter's, from the launch plans: attention at the
kernels' tiles) and **model** FLOPs (``torch.utils.flop_counter.FlopCounterMode``: the registered
formulas at the exact shapes), the latter MFU's numerator, each side its own:
``MFU = model FLOPs / (roofline time x 989.4 TFLOP/s)``. The roofline time is the sum over kernels
of ``max(FLOPs / 989.4 TFLOP/s, bytes / 3.35 TB/s)`` on an H100 SXM (no launch gaps, no overlap).

The per-part breakdown measures each part alone from leaf inputs (teacher; student backbone from
the images to its output tokens; decoder from those tokens to the pixels; DINO head + both losses
from the tokens and pixels to the loss). The parts add up to the whole step except where they meet:
the gradient accumulation of the backbone output (used by the decoder and the head) and the kept
storages two parts share; the table prints that difference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .cost import CostReport, measure
from .device import H100_SXM
from .official_block import OfficialStyleBlock, _Norm

BF16 = torch.bfloat16
META = torch.device("meta")
TARGETS = {"roofline_s": 0.80, "saved_bytes": 0.70}  # the targets, ours / baseline
PARTS = ("teacher", "student backbone", "decoder", "heads + loss")


# ------------------------------------------------------------------------------------------ config


def pretrain_config(arch: str = "sapiens2_1b", img=(1024, 768), mask_ratio: float = 0.75, n_global: int = 2,
                    n_local: int = 8, local_img=None, decoder=(512, 8, 16), head=(65536, 2048, 256)):
    """The zoo recipe for ``arch`` (``sapiens2.pretrain.config`` defaults): ``img`` global views,
    ``local_img`` (default half of ``img``) local views."""
    from ..pretrain.config import ModelConfig, ObjectiveConfig, PretrainConfig

    img = tuple(img)
    local_img = tuple(local_img) if local_img else (img[0] // 2, img[1] // 2)
    obj = ObjectiveConfig(mask_ratio=mask_ratio, global_size=img, local_size=local_img, n_global=n_global,
                          n_local=n_local, decoder_width=decoder[0], decoder_depth=decoder[1],
                          decoder_heads=decoder[2], head_prototypes=head[0], head_hidden=head[1],
                          head_bottleneck=head[2])
    cfg = PretrainConfig(preset=f"{arch} (bench)", model=ModelConfig(arch=arch), objective=obj)
    cfg.data.image_size = img
    return cfg


# ------------------------------------------------------------------------------------------ results


@dataclass
class StepCost:
    """One pretraining step: the teacher's forward and the student's forward + backward."""

    label: str
    teacher: CostReport
    student: CostReport
    model_flops: Optional[int] = None  # FlopCounterMode count of the whole step
    parts: dict = field(default_factory=dict)  # part name -> CostReport, each measured alone
    params: int = 0  # student parameters

    @property
    def total(self) -> CostReport:
        return CostReport(self.label, self.student.ops + self.teacher.ops, self.student.saved_bytes,
                          self.student.unit_bytes)

    def summary(self) -> dict:
        d = self.total.summary()
        d["model_flops"] = self.model_flops
        d["mfu"] = (self.model_flops / (d["roofline_s"] * H100_SXM.bf16_flops)
                    if self.model_flops is not None else None)
        d["teacher_roofline_s"] = self.teacher.roofline_s
        d["student_roofline_s"] = self.student.roofline_s
        d["params"] = self.params
        return d

    def parts_summary(self) -> dict:
        return {k: {"roofline_s": r.roofline_s, "bytes": r.bytes, "saved_bytes": r.saved_bytes, "flops": r.flops,
                    "kernels": r.kernels} for k, r in self.parts.items()}


# ------------------------------------------------------------------------------------------ helpers


class _Grab(nn.Module):
    """Stands in for a module: keeps its first input and returns it (no kernel)."""

    def forward(self, x, *args, **kwargs):
        self.x = x
        return x


@contextlib.contextmanager
def _swapped(module: nn.Module, **subs):
    old = {k: getattr(module, k) for k in subs}
    for k, v in subs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _root(t: Tensor) -> Tensor:
    while t._base is not None:
        t = t._base
    return t


def _leaf(like: Tensor) -> Tensor:
    return torch.empty(like.shape, device=META, dtype=like.dtype, requires_grad=True)


def model_flops(teacher_fn: Callable[[], object], student_fn: Callable[[], Tensor], params) -> int:
    """``FlopCounterMode`` count of a step: the teacher's forward (no grad), the student's forward and
    the backward of its loss into every parameter."""
    params = [p for p in params if p.requires_grad]
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            teacher_fn()
        loss = student_fn()
        torch.autograd.grad([loss], params, allow_unused=True)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class StepInputs:
    g: Tensor  # (Vg*B, 3, Hg, Wg) global views
    loc: Optional[Tensor]  # (Vl*B, 3, Hl, Wl) local views, or None
    vis: Tensor  # (Vg*B, K) visible trunk-token ids (ours), = MAE's ids_keep (baseline)
    restore: Tensor  # (Vg*B, n) MAE's ids_restore (baseline)
    t_logits: Tensor  # (Vg*B, prototypes) the teacher's logits, as the student step receives them
    center: Optional[Tensor]
    grid: tuple[int, int]
    patch_px: int


def step_inputs(cfg, patch_px: int, batch: int = 1) -> StepInputs:
    from ..pretrain.masking import num_visible

    o = cfg.objective
    (Hg, Wg), (Hl, Wl) = o.global_size, o.local_size
    th, tw = Hg // patch_px, Wg // patch_px
    K = num_visible(th * tw, o.mask_ratio)
    g = torch.empty(o.n_global * batch, 3, Hg, Wg, device=META, dtype=BF16)
    loc = torch.empty(o.n_local * batch, 3, Hl, Wl, device=META, dtype=BF16) if o.n_local else None
    vis = torch.empty(o.n_global * batch, K, device=META, dtype=torch.int64)
    restore = torch.empty(o.n_global * batch, th * tw, device=META, dtype=torch.int64)
    t_logits = torch.empty(o.n_global * batch, o.head_prototypes, device=META, dtype=BF16)
    center = (torch.empty(1, o.head_prototypes, device=META, dtype=torch.float32)
              if o.centering == "center" else None)
    return StepInputs(g, loc, vis, restore, t_logits, center, (th, tw), patch_px)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ ours


def _unit(x: StepInputs, backbone) -> int:
    """Bytes of one bf16 activation over every student row of the step (the tables' unit)."""
    rows = x.g.shape[0] + (x.loc.shape[0] if x.loc is not None else 0)
    return rows * (backbone.num_prefix_tokens + x.vis.shape[1]) * backbone.embed_dims * 2


def _measure_step(side: str, teacher_fn, student_loss, s_params, unit: int, n_params: int,
                  flops: bool) -> StepCost:
    """One side's step: the teacher's forward (no grad) and the student's forward + backward of its
    loss, each costed with ``measure``, and optionally the step's model FLOPs."""
    t_rep = measure(f"{side} teacher", lambda: (teacher_fn(),), [], unit, train=False)
    s_rep = measure(f"{side} student", lambda: (student_loss(),), s_params, unit)
    res = StepCost(side, t_rep, s_rep, params=n_params)
    if flops:
        res.model_flops = model_flops(teacher_fn, student_loss, s_params)
    return res


def build_ours(cfg):
    """``(student, teacher)`` on the meta device in bf16."""
    from ..pretrain.objective import PretrainStudent, PretrainTeacher

    student = PretrainStudent(cfg, device=META).to(BF16)
    teacher = PretrainTeacher(cfg, device=META).to(BF16)
    teacher.requires_grad_(False)
    return student, teacher


def ours_step(cfg, batch: int = 1, checkpointing: str = "none", parts: bool = True,
              flops: bool = True) -> StepCost:
    """Our step, costed. ``checkpointing``: ``apply_checkpointing`` mode on the student's trunk
    blocks (the recompute is then counted in the backward; the student's ``saved_bytes`` then holds
    what is kept outside the checkpointed blocks and their inputs, not the activations of the block
    being recomputed: ``sapiens2.pretrain.dry_run.measure_step`` adds those)."""
    from ..pretrain.objective import joint_loss
    from ..train.parallelize import apply_checkpointing

    student, teacher = build_ours(cfg)
    apply_checkpointing(student.backbone.blocks, checkpointing)
    bb = student.backbone
    x = step_inputs(cfg, bb.patch_size * bb.window, batch)
    temp = cfg.objective.teacher_temp
    s_params = list(student.parameters())

    def loss_of(pixels, logits, cls):
        return joint_loss(cfg, x.g, x.vis, pixels, logits, x.t_logits, temp, x.patch_px, center=x.center,
                          student_cls=cls)["loss"]

    def student_loss():
        return loss_of(*student(x.g, x.vis, x.loc))

    unit = _unit(x, bb)
    res = _measure_step("ours", lambda: teacher(x.g), student_loss, s_params, unit, _count(student), flops)
    if parts:
        dec, head = _Grab(), _Grab()

        def backbone():
            with _swapped(student, decoder=dec, dino_head=head):
                student(x.g, x.vis, x.loc)
            return (_root(head.x),)

        bb_rep = measure("ours student backbone", backbone, bb.parameters(), unit)
        out = _root(head.x)
        d = dec.x
        if d.storage_offset() or d.stride() != out.stride():
            raise RuntimeError("the decoder's input is not a leading slice of the backbone output")
        out_d, out_h = _leaf(out), _leaf(out)
        pix = _leaf(torch.empty(x.g.shape, device=META, dtype=BF16))
        dec_rep = measure("ours decoder", lambda: (student.decoder(out_d[: d.shape[0], : d.shape[1]], x.vis, x.grid),),
                          student.decoder.parameters(), unit, (out_d,))
        head_rep = measure("ours heads + loss", lambda: (loss_of(pix, student.dino_head(out_h[:, 0]), out_h[:, 0]),),
                           student.dino_head.parameters(), unit, (out_h, pix))
        res.parts = dict(zip(PARTS, (res.teacher, bb_rep, dec_rep, head_rep)))
    return res


# ------------------------------------------------------------------------------------------ baseline


class OfficialStyleBackbone(nn.Module):
    """The newest official Sapiens2 backbone's op sequence, built with the shapes of one of ours (on its
    device and dtype): patch conv, [CLS] + registers, RoPE tables per call, official-style blocks,
    final ``nn.RMSNorm``. ``ids_keep`` (B, K): MAE masking — gather the visible tokens (and RoPE
    rows) after the full patch conv."""

    def __init__(self, ours):
        super().__init__()
        from ..models.rope import Rope2D

        if ours.tokenizer is not None:
            raise ValueError("the official-style baseline has no 4K (tokenizer) form")
        w = ours.cls_token
        C, p = ours.embed_dims, ours.patch_size
        self.num_prefix_tokens = ours.num_prefix_tokens
        with torch.device(w.device):
            self.patch_embed = nn.Conv2d(ours.in_channels, C, p, p).to(w.dtype)
            self.cls_token = nn.Parameter(torch.empty_like(ours.cls_token))
            self.storage_tokens = nn.Parameter(torch.empty_like(ours.storage_tokens))
            self.rope = Rope2D(ours.rope_embed.head_dim, ours.rope_embed.base, ours.rope_embed.dtype)
            self.norm = _Norm(C, gpu_like=True).to(w.dtype)
        self.blocks = nn.ModuleList(OfficialStyleBlock.from_ours(b, gpu_like=True) for b in ours.blocks)
        self.patch_size = p

    def forward(self, images: Tensor, ids_keep: Optional[Tensor] = None) -> Tensor:
        B, _, H, W = images.shape
        th, tw = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        sin, cos = self.rope(th, tw)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
            sin, cos = sin[ids_keep][:, None], cos[ids_keep][:, None]  # (B, 1, K, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        return self.norm(x)


class _MAEDecoderBlock(OfficialStyleBlock):
    """An official-style block without LayerScale (MAE's decoder blocks have none, nor do ours)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.gamma

    def attn(self, x, sin, cos):
        B, N, C = x.shape
        q = self.wq(x).view(B, N, self.h, self.d).permute(0, 2, 1, 3)
        k = self.wk(x).view(B, N, self.hkv, self.d).permute(0, 2, 1, 3)
        v = self.wv(x).view(B, N, self.hkv, self.d).permute(0, 2, 1, 3)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, sin, cos), self._rope(k, sin, cos)
        D = q.shape[-1]
        pad = -D % 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        o = torch.ops.sapiens2_cost.flash_sdpa(q, k, v, D ** -0.5)[0]
        if pad:
            o = o[..., :D]
        return self.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))


class OfficialStyleMAEDecoder(nn.Module):
    """MAE's decoder on official-style blocks, with the shapes of our ``MAEDecoder``."""

    def __init__(self, ours):
        super().__init__()
        from ..models.rope import Rope2D

        w = ours.mask_token
        width = ours.embed.out_features
        self.num_prefix_tokens = ours.num_prefix_tokens
        with torch.device(w.device):
            self.embed = nn.Linear(ours.embed.in_features, width).to(w.dtype)
            self.mask_token = nn.Parameter(torch.empty_like(w))
            self.rope = Rope2D(ours.rope.head_dim, ours.rope.base, ours.rope.dtype)
            self.norm = _Norm(width, gpu_like=True).to(w.dtype)
            self.pred = nn.Linear(width, ours.pred.out_features).to(w.dtype)
        self.blocks = nn.ModuleList(_MAEDecoderBlock.from_ours(b, gpu_like=True) for b in ours.blocks)

    def forward(self, tokens: Tensor, ids_restore: Tensor, grid_hw) -> Tensor:
        """``tokens`` (B, P + K, C) -> predicted patch pixels (B, n, p*p*3)."""
        P = self.num_prefix_tokens
        th, tw = grid_hw
        x = self.embed(tokens)
        B, L, W = x.shape
        mask_tokens = self.mask_token.expand(B, th * tw + P - L, W)
        x_ = torch.cat([x[:, P:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, W))  # unshuffle
        x = torch.cat([x[:, :P], x_], dim=1)
        sin, cos = self.rope(th, tw)
        sin, cos = sin.to(x.dtype), cos.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        return self.pred(self.norm(x)[:, P:])


class PlainDINOHead(nn.Module):
    """DINO head in plain PyTorch: ``nn.Linear``/``nn.GELU`` MLP -> ``F.normalize`` -> bias-free
    prototypes; the shapes of our ``DINOHead``."""

    def __init__(self, ours):
        super().__init__()
        w = ours.last_layer.weight
        layers = []
        lin = [m for m in ours.mlp if isinstance(m, nn.Linear)]
        with torch.device(w.device):
            for i, m in enumerate(lin):
                layers.append(nn.Linear(m.in_features, m.out_features).to(w.dtype))
                if i < len(lin) - 1:
                    layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers)
            last = ours.last_layer
            self.last_layer = nn.Linear(last.in_features, last.out_features, bias=False).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def mae_loss(images: Tensor, pred: Tensor, ids_restore: Tensor, num_keep: int, patch_px: int) -> Tensor:
    """MAE's ``forward_loss`` with ``norm_pix_loss=True`` (fp32), the mask built as ``random_masking``
    builds it."""
    from ..pretrain.mae import patchify

    B, n = ids_restore.shape
    mask = torch.ones(B, n, device=images.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    target = patchify(images.float(), patch_px)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.float() - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def baseline_loss(cfg, x: StepInputs, pred: Tensor, s_logits: Tensor, teacher_temp: float, global_cls: Tensor
                  ) -> Tensor:
    from ..pretrain.dino import dino_cross_entropy, dino_loss_scales, koleo_loss, sinkhorn_knopp, softmax_center

    o = cfg.objective
    Vg, Vl = o.n_global, o.n_local
    B = x.g.shape[0] // Vg
    loss_mae = mae_loss(x.g, pred, x.restore, x.vis.shape[1], x.patch_px)
    if o.centering == "sinkhorn":
        probs = sinkhorn_knopp(x.t_logits, teacher_temp, o.sinkhorn_iters)
    else:
        probs = softmax_center(x.t_logits, x.center, teacher_temp)
    probs = probs.view(Vg, B, -1)
    s = s_logits.float()
    g_scale, l_scale = dino_loss_scales(Vg, Vl, ignore_diagonal=Vg > 1)
    loss_cl = g_scale * dino_cross_entropy(s[: Vg * B].view(Vg, B, -1), probs, o.student_temp,
                                           ignore_diagonal=Vg > 1)
    if Vl:
        loss_cl = loss_cl + l_scale * dino_cross_entropy(s[Vg * B:].view(Vl, B, -1), probs, o.student_temp)
    loss = loss_mae + o.lambda_cl * loss_cl
    if o.koleo_weight:  # DINOv2/v3's KoLeo, per global view (a plain PyTorch function either way)
        loss = loss + o.koleo_weight * sum(koleo_loss(c) for c in global_cls.view(Vg, B, -1))
    return loss


class BaselineStudent(nn.Module):
    def __init__(self, ours_student):
        super().__init__()
        self.backbone = OfficialStyleBackbone(ours_student.backbone)
        self.decoder = OfficialStyleMAEDecoder(ours_student.decoder)
        self.dino_head = PlainDINOHead(ours_student.dino_head)

    def encode(self, g, ids_keep, loc):
        """Two backbone calls: the masked globals, then the locals."""
        hg = self.backbone(g, ids_keep)
        hl = self.backbone(loc) if loc is not None else None
        return hg, hl

    def heads(self, hg, hl):
        cls = hg[:, 0] if hl is None else torch.cat([hg[:, 0], hl[:, 0]])
        return self.dino_head(cls)


class BaselineTeacher(nn.Module):
    def __init__(self, ours_teacher):
        super().__init__()
        self.backbone = OfficialStyleBackbone(ours_teacher.backbone)
        self.dino_head = PlainDINOHead(ours_teacher.dino_head)

    def forward(self, g):
        return self.dino_head(self.backbone(g)[:, 0])


def baseline_step(cfg, batch: int = 1, parts: bool = True, flops: bool = True) -> StepCost:
    """The baseline's step, costed (see the module docstring)."""
    if cfg.model.use_tokenizer:
        raise ValueError("the baseline has no 4K (tokenizer) form; cost it with a plain arch")
    o_student, o_teacher = build_ours(cfg)
    student, teacher = BaselineStudent(o_student), BaselineTeacher(o_teacher)
    teacher.requires_grad_(False)
    x = step_inputs(cfg, o_student.backbone.patch_size, batch)
    temp = cfg.objective.teacher_temp
    s_params = list(student.parameters())

    def student_loss():
        hg, hl = student.encode(x.g, x.vis, x.loc)
        pred = student.decoder(hg, x.restore, x.grid)
        return baseline_loss(cfg, x, pred, student.heads(hg, hl), temp, hg[:, 0])

    unit = _unit(x, o_student.backbone)
    res = _measure_step("baseline", lambda: teacher(x.g), student_loss, s_params, unit, _count(student), flops)
    if parts:
        held = {}

        def backbone():
            held["h"] = student.encode(x.g, x.vis, x.loc)
            return held["h"]

        bb_rep = measure("baseline student backbone", backbone, student.backbone.parameters(), unit)
        hg, hl = held["h"]
        hg_d = _leaf(hg)
        dec_rep = measure("baseline decoder", lambda: (student.decoder(hg_d, x.restore, x.grid),),
                          student.decoder.parameters(), unit, (hg_d,))
        hg_h, hl_h = _leaf(hg), (_leaf(hl) if hl is not None else None)
        pred = _leaf(torch.empty(*x.restore.shape, student.decoder.pred.out_features, device=META, dtype=BF16))
        head_rep = measure("baseline heads + loss",
                           lambda: (baseline_loss(cfg, x, pred, student.heads(hg_h, hl_h), temp, hg_h[:, 0]),),
                           student.dino_head.parameters(), unit, tuple(t for t in (hg_h, hl_h, pred) if t is not None))
        res.parts = dict(zip(PARTS, (res.teacher, bb_rep, dec_rep, head_rep)))
    return res


def pretrain_costs(arch: str = "sapiens2_1b", img=(1024, 768), batch: int = 1, parts: bool = True,
                   cfg=None) -> tuple[StepCost, StepCost]:
    """(ours, baseline) for one pretraining step of ``batch`` images."""
    cfg = cfg if cfg is not None else pretrain_config(arch, img)
    cfg.validate(1)
    return ours_step(cfg, batch, parts=parts), baseline_step(cfg, batch, parts=parts)


# ------------------------------------------------------------------------------------------ table


def _gb(v):
    return f"{v / 1e9:.3f} GB"


_ROWS = [
    ("model_flops", "model FLOPs (FlopCounterMode)", lambda v: f"{v / 1e12:.3f} T"),
    ("flops", "FLOPs executed (at tiles)", lambda v: f"{v / 1e12:.3f} T"),
    ("bytes", "bytes moved", _gb),
    ("bytes_outside_matmul", "  outside matmuls/attention", _gb),
    ("kernels", "kernel launches", lambda v: f"{v}"),
    ("saved_bytes", "bytes kept for backward", _gb),
    ("roofline_s", "H100 roofline step time", lambda v: f"{v * 1e3:.2f} ms"),
    ("mfu", "MFU at that time", lambda v: f"{v:.3f}"),
]


def verdict(ours: StepCost, base: StepCost) -> dict:
    a, b = ours.summary(), base.summary()
    return {k: {"ratio": a[k] / b[k], "target": t, "met": a[k] / b[k] <= t} for k, t in TARGETS.items()}


def format_table(ours: StepCost, base: StepCost, title: str = "") -> str:
    a, b = ours.summary(), base.summary()
    v = verdict(ours, base)
    lines = [title] if title else []
    lines.append(f"{'per step':<32}{'ours':>16}{'baseline':>16}{'ratio':>8}   target")
    for key, name, fmt in _ROWS:
        if a.get(key) is None or b.get(key) is None:
            continue
        r = f"{a[key] / b[key]:.3f}" if b[key] else "-"
        tgt = ""
        if key in v:
            tgt = f"<= {v[key]['target']:.2f}  {'met' if v[key]['met'] else 'NOT met'}"
        lines.append(f"{name:<32}{fmt(a[key]):>16}{fmt(b[key]):>16}{r:>8}   {tgt}")
    if ours.parts and base.parts:
        lines.append("")
        lines.append("per part (each measured alone from leaf inputs), roofline time | bytes moved | "
                     "kept for backward:")
        cols = f"{'ours':>10}{'base':>10}{'ratio':>7}"
        lines.append(f"{'part':<20}{cols}{'saves':>9} |{cols} |{cols}")
        dt = b["roofline_s"] - a["roofline_s"]
        tot_a = {"roofline_s": 0.0, "bytes": 0, "saved_bytes": 0}
        tot_b = dict(tot_a)
        for part in PARTS:
            pa, pb = ours.parts[part], base.parts[part]
            cells = []
            for key in ("roofline_s", "bytes", "saved_bytes"):
                x, y = getattr(pa, key), getattr(pb, key)
                tot_a[key] += x
                tot_b[key] += y
                fx = (lambda z: f"{z * 1e3:.2f}ms") if key == "roofline_s" else (lambda z: f"{z / 1e9:.2f}GB")
                cells.append(f"{fx(x):>10}{fx(y):>10}" + (f"{x / y:>7.3f}" if y else f"{'-':>7}"))
                if key == "roofline_s":
                    cells[-1] += f"{(y - x) / dt if dt else 0:>8.0%} "
            lines.append(f"{part:<20}" + " |".join(cells))
        lines.append(f"{'sum of parts':<20}{tot_a['roofline_s'] * 1e3:>8.2f}ms{tot_b['roofline_s'] * 1e3:>8.2f}ms"
                     f"{'':>16} |{tot_a['bytes'] / 1e9:>8.2f}GB{tot_b['bytes'] / 1e9:>8.2f}GB{'':>7}"
                     f" |{tot_a['saved_bytes'] / 1e9:>8.2f}GB{tot_b['saved_bytes'] / 1e9:>8.2f}GB")
        lines.append(f"{'whole step':<20}{a['roofline_s'] * 1e3:>8.2f}ms{b['roofline_s'] * 1e3:>8.2f}ms"
                     f"{'':>16} |{a['bytes'] / 1e9:>8.2f}GB{b['bytes'] / 1e9:>8.2f}GB{'':>7}"
                     f" |{a['saved_bytes'] / 1e9:>8.2f}GB{b['saved_bytes'] / 1e9:>8.2f}GB")
        lines.append("('saves': the part's share of the step time ours saves over the baseline; the parts differ "
                     "from the whole\n where they meet: the backbone output's gradient accumulation and storages "
                     "kept by two parts)")
    lines.append("")
    for key, name in (("roofline_s", "predicted step time"), ("saved_bytes", "bytes kept for backward")):
        r = v[key]
        if r["met"]:
            lines.append(f"target {name} <= {r['target']:.2f}x baseline: met ({r['ratio']:.3f}x)")
        else:
            lines.append(f"target {name} <= {r['target']:.2f}x baseline: NOT met ({r['ratio']:.3f}x, "
                         f"{r['ratio'] / r['target'] - 1:+.1%} over the target)")
    return "\n".join(lines)


def describe(cfg, batch: int) -> str:
    o = cfg.objective
    (Hg, Wg), (Hl, Wl) = o.global_size, o.local_size
    return (f"{cfg.model.arch} pretraining step, {batch} image(s): {o.n_global} global views {Hg}x{Wg} "
            f"({o.mask_ratio:.0%} masked) + {o.n_local} local views {Hl}x{Wl}; teacher on the unmasked globals "
            f"(no grad); decoder {o.decoder_width}/{o.decoder_depth}/{o.decoder_heads}; DINO head "
            f"{o.head_prototypes} prototypes (hidden {o.head_hidden}, bottleneck {o.head_bottleneck}); bf16, "
            "meta device, H100 SXM roofline")


def run_pretrain_cost(args) -> int:
    import json
    import time

    arch = args.arch or "sapiens2_1b"
    img = tuple(args.img) if args.img else (1024, 768)
    mask = 0.75 if args.mask_ratio is None else args.mask_ratio
    cfg = pretrain_config(arch, img, mask_ratio=mask)
    t0 = time.perf_counter()
    ours, base = pretrain_costs(arch, img, args.batch, cfg=cfg)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"ours": ours.summary(), "baseline": base.summary(), "verdict": verdict(ours, base),
                          "parts": {"ours": ours.parts_summary(), "baseline": base.parts_summary()},
                          "seconds": took}, indent=1))
        return 0
    print(describe(cfg, args.batch))
    print(format_table(ours, base))
    print(f"\n(counted in {took:.1f} s on this machine)")
    return 0


__all__ = ["StepCost", "pretrain_config", "ours_step", "baseline_step", "pretrain_costs", "format_table",
           "model_flops", "verdict", "OfficialStyleBackbone", "OfficialStyleMAEDecoder",
           "PlainDINOHead", "mae_loss", "run_pretrain_cost"]
