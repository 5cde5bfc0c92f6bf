"""The pretraining networks and their joint objective L = L_MAE + lambda * L_CL.

``PretrainStudent`` runs every view of a step in **one** backbone pass: the masked global views
(visible tokens only, their RoPE positions gathered) and the local views are embedded separately,
then stacked along the batch — right-padded to a common length with ``seq_lens`` when their token
counts differ — and go through the trunk once. Norms, Linears and FFNs see one batch; attention
keeps each row to its own tokens. Under FSDP2 each block's parameters are therefore all-gathered
once per forward (and once per backward), not once per view. The decoder reconstructs the global
views' pixels from their rows; the DINO head maps every view's [CLS].

``PretrainTeacher`` (the EMA of the student's backbone and head) sees the global views unmasked,
without grad.

Design choices (docs/pretraining.md): both global views are masked for the student (the MAE branch
gets two reconstructions per image, and the student's global [CLS] must agree with the teacher's
view of the *other* full crop — a harder, masked-to-full prediction, as in iBOT); global↔global
pairs exclude the diagonal (cross-view only, the paper's S); local views are not masked.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.backbone import Sapiens2Backbone
from .config import PretrainConfig
from .dino import DINOHead, dino_cross_entropy, dino_loss_scales, koleo_loss, sinkhorn_knopp, softmax_center
from .mae import MAEDecoder, norm_pix_loss
from .masking import mask_from_visible


def build_backbone(cfg: PretrainConfig, device=None) -> Sapiens2Backbone:
    m = cfg.model
    return Sapiens2Backbone(m.arch_config(), img_size=cfg.objective.global_size, patch_size=m.patch_size,
                            use_tokenizer=m.use_tokenizer, out_type="raw", layer_scale_init=m.layer_scale_init,
                            device=device)


def build_head(cfg: PretrainConfig, dims: int) -> DINOHead:
    o = cfg.objective
    return DINOHead(dims, o.head_prototypes, o.head_hidden, o.head_bottleneck, o.head_layers)


class PretrainTeacher(nn.Module):
    def __init__(self, cfg: PretrainConfig, device=None):
        super().__init__()
        self.backbone = build_backbone(cfg, device)
        with torch.device(device or torch.get_default_device()):
            self.dino_head = build_head(cfg, self.backbone.embed_dims)

    def ema_modules(self) -> list[nn.Module]:
        """The modules the EMA follows, in the student's matching order."""
        return [self.backbone, self.dino_head]

    def forward(self, global_views: Tensor) -> Tensor:
        """``(Vg*B, 3, H, W)`` -> prototype logits of each view's [CLS] ``(Vg*B, K)``."""
        return self.dino_head(self.backbone(global_views)[:, 0])


class PretrainStudent(nn.Module):
    def __init__(self, cfg: PretrainConfig, device=None):
        super().__init__()
        o = cfg.objective
        self.backbone = build_backbone(cfg, device)
        bb = self.backbone
        with torch.device(device or torch.get_default_device()):
            self.dino_head = build_head(cfg, bb.embed_dims)
            self.decoder = MAEDecoder(bb.embed_dims, bb.patch_size * bb.window, o.decoder_width, o.decoder_depth,
                                      o.decoder_heads, bb.num_prefix_tokens, bb.in_channels)

    def ema_modules(self) -> list[nn.Module]:
        return [self.backbone, self.dino_head]

    def forward(self, global_views: Tensor, visible_ids: Tensor, local_views: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``global_views`` ``(Vg*B, 3, Hg, Wg)`` with ``visible_ids`` ``(Vg*B, K)``; ``local_views``
        ``(Vl*B, 3, Hl, Wl)`` or None. Returns ``(reconstruction of the global views (Vg*B, 3, Hg, Wg),
        [CLS] prototype logits (Vg*B + Vl*B, K_proto), the [CLS] tokens themselves (Vg*B + Vl*B, C))``,
        rows in the input order."""
        bb = self.backbone
        P = bb.num_prefix_tokens
        xg, (th, tw) = bb.embed(global_views, visible_ids)
        sg, cg = bb.rope_tables(th, tw, visible_ids)
        parts = [(xg, sg, cg)]
        if local_views is not None and local_views.shape[0]:
            xl, (lh, lw) = bb.embed(local_views)
            sl, cl = bb.rope_tables(lh, lw)
            n = xl.shape[0]
            parts.append((xl, sl.expand(n, -1, -1), cl.expand(n, -1, -1)))
        x, sin, cos, seq_lens = _stack_rows(parts, P)
        out = bb.forward_tokens(x, (sin, cos), seq_lens)
        cls = out[:, 0]
        logits = self.dino_head(cls)
        K = visible_ids.shape[1]
        pixels = self.decoder(out[: xg.shape[0], : P + K], visible_ids, (th, tw))
        return pixels, logits, cls


def _stack_rows(parts, num_prefix: int):
    """Stack token groups along the batch, right-padding shorter groups (their ``seq_lens`` mark the
    valid rows; padded RoPE rows are zeros and never used)."""
    longest = max(p[0].shape[1] for p in parts)
    if all(p[0].shape[1] == longest for p in parts):
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]), None)
    xs, ss, cs, lens = [], [], [], []
    for x, s, c in parts:
        pad = longest - x.shape[1]
        xs.append(F.pad(x, (0, 0, 0, pad)))
        ss.append(F.pad(s, (0, 0, 0, pad)))
        cs.append(F.pad(c, (0, 0, 0, pad)))
        lens.append(torch.full((x.shape[0],), num_prefix + x.shape[1], dtype=torch.int32, device=x.device))
    return torch.cat(xs), torch.cat(ss), torch.cat(cs), torch.cat(lens)


def joint_loss(cfg: PretrainConfig, global_views: Tensor, visible_ids: Tensor, pixels: Tensor, student_logits: Tensor,
               teacher_logits: Tensor, teacher_temp: float, patch_px: int, weights: Optional[Tensor] = None,
               center: Optional[Tensor] = None, student_cls: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The joint objective of one step on this rank's rows:
    ``loss = loss_mae + lambda_cl * loss_cl + koleo_weight * loss_koleo``. Returns those terms and the
    two cross-entropy terms. ``patch_px``: pixels per trunk token side; ``weights`` ``(B,)`` (per
    image) drop unreadable images from every average; ``student_cls``: the student's [CLS] tokens
    (its third output), needed when ``objective.koleo_weight`` > 0 — KoLeo is summed over the global
    views, each view's batch on its own, as DINOv2/v3 apply it."""
    o = cfg.objective
    Vg, Vl = o.n_global, o.n_local
    B = global_views.shape[0] // Vg
    n_tokens = (global_views.shape[2] // patch_px) * (global_views.shape[3] // patch_px)
    mask = mask_from_visible(visible_ids, n_tokens)
    w_views = None if weights is None else weights.repeat(Vg)
    loss_mae = norm_pix_loss(global_views, pixels, mask, patch_px, w_views)
    if o.centering == "sinkhorn":
        probs = sinkhorn_knopp(teacher_logits, teacher_temp, o.sinkhorn_iters)
    else:
        probs = softmax_center(teacher_logits, center, teacher_temp)
    probs = probs.view(Vg, B, -1)
    s = student_logits.float()
    g_scale, l_scale = dino_loss_scales(Vg, Vl, ignore_diagonal=Vg > 1)
    cl_global = dino_cross_entropy(s[: Vg * B].view(Vg, B, -1), probs, o.student_temp, ignore_diagonal=Vg > 1,
                                   weights=weights)
    loss_cl = g_scale * cl_global
    out = {"loss_cl_global": cl_global}
    if Vl:
        cl_local = dino_cross_entropy(s[Vg * B:].view(Vl, B, -1), probs, o.student_temp, weights=weights)
        loss_cl = loss_cl + l_scale * cl_local
        out["loss_cl_local"] = cl_local
    loss = loss_mae + o.lambda_cl * loss_cl
    if o.koleo_weight:
        if student_cls is None:
            raise ValueError("objective.koleo_weight > 0 needs student_cls (the student's third output)")
        loss_koleo = sum(koleo_loss(c, weights=weights) for c in student_cls[: Vg * B].view(Vg, B, -1))
        loss = loss + o.koleo_weight * loss_koleo
        out["loss_koleo"] = loss_koleo
    out.update(loss=loss, loss_mae=loss_mae, loss_cl=loss_cl)
    return out

