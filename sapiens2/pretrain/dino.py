"""The contrastive branch: DINO head, Sinkhorn-Knopp teacher targets, cross-entropy, EMA teacher.

Semantics follow facebookresearch/dinov3 (``dino_head.py``, ``dino_clstoken_loss.py``,
``ssl_meta_arch.py``); tests hold them to fixtures generated from that code.

The cross-entropy, as a loop (``dino_cross_entropy``)::

    loss = 0; count = 0
    for b in batch:
        for s in student views:
            for t in teacher views:
                if ignore_diagonal and s == t: continue      # the same view on both sides
                loss += w[b] * H(teacher_probs[t, b], softmax(student_logits[s, b] / student_temp))
                count += w[b]
    return loss / count

computed as one ``einsum`` over the log-softmax. ``w`` (optional) drops unreadable images.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.layers import reset_weights


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear, GELU between) -> bottleneck -> L2-normalise -> ``K`` prototypes
    (a bias-free Linear, frozen for the first steps by the trainer)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if self.last_layer.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        reset_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world(group) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def _all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temp: float, n_iters: int = 3, group=None) -> Tensor:
    """Teacher targets ``(B, K)``: ``exp(logits / temp)`` balanced by ``n_iters`` Sinkhorn-Knopp
    iterations so that every prototype gets ``1/K`` of the mass over the *global* batch (sums are
    all-reduced over ``group`` when a process group is up) and every row sums to 1."""
    logits = teacher_logits.float() / temp
    # minus each prototype's max over the global batch: exp cannot overflow, and a per-prototype shift
    # cancels exactly in the first per-prototype normalisation (DINOv3 exponentiates as is and
    # overflows for logits / temp > 88)
    top = _all_reduce(logits.max(dim=0, keepdim=True).values, group, dist.ReduceOp.MAX)
    Q = torch.exp(logits - top).t()  # (K, B)
    K, B = Q.shape[0], Q.shape[1] * _world(group)
    Q /= _all_reduce(Q.sum(), group)
    for _ in range(n_iters):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True), group)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


@torch.no_grad()
def softmax_center(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """The centering alternative to Sinkhorn-Knopp: ``softmax((logits - center) / temp)``."""
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9, group=None) -> Tensor:
    """EMA of the global batch mean of the teacher logits (in place; returns ``center``)."""
    batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True), group)
    center.mul_(momentum).add_(batch_sum / (teacher_logits.shape[0] * _world(group)), alpha=1 - momentum)
    return center


def dino_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1,
                       ignore_diagonal: bool = False, weights: Optional[Tensor] = None) -> Tensor:
    """``student_logits`` ``(S, B, K)``, ``teacher_probs`` ``(T, B, K)``: see the module docstring."""
    S, B, _ = student_logits.shape
    T = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != student_logits.shape[1:]:
        raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must agree in batch and prototypes")
    logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    tp = teacher_probs.float()
    if weights is not None:
        tp = tp * weights.to(tp.dtype)[None, :, None]
    wsum = float(B) if weights is None else weights.float().sum()
    pairs = torch.einsum("sbk,tbk->st", logp, tp)
    if ignore_diagonal:
        d = min(S, T)
        pairs = pairs.diagonal_scatter(pairs.new_zeros(d))
        count = wsum * (S * T - d)
    else:
        count = wsum * S * T
    return -pairs.sum() / count


def dino_loss_scales(n_global: int, n_local: int, ignore_diagonal: bool = True) -> tuple[float, float]:
    """DINOv3's weights of the global and local cross-entropies: each term's share of the pairs."""
    g = n_global * (n_global - 1) if ignore_diagonal else n_global ** 2
    loc = n_global * n_local
    return g / (g + loc), loc / (g + loc)


def koleo_loss(features: Tensor, eps: float = 1e-8, weights: Optional[Tensor] = None, group=None) -> Tensor:
    """The KoLeo regulariser of DINOv2/v3 (Sablayrolles et al.'s Kozachenko-Leonenko differential-entropy
    estimator): rows of ``features`` ``(N, C)`` are L2-normalised, each row's nearest *other* row is found
    (no grad through the choice) and the loss is ``-mean_i log(||x_i - x_nn(i)|| + eps)``. Minimising it
    spreads the batch's [CLS] features over the sphere, so no two images share one: without it a small
    model's [CLS] features bunch together and the Sinkhorn targets cannot tell them apart.

    Over several ranks the neighbours are searched in the *global* batch (every rank's rows gathered
    with an autograd all-gather, so each row's gradient also reaches the rank that owns its neighbour):
    the loss and its gradient are those of one process holding the whole batch, whatever the world
    size. ``weights`` ``(N,)``: rows with weight 0 (unreadable images) are neither averaged nor anyone's
    neighbour. Fewer than two valid rows: the loss is 0 (with a graph, so callers need no special case)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, C), got {tuple(features.shape)}")
    n = features.shape[0]
    w = features.new_ones(n, dtype=torch.float32) if weights is None else weights.to(features.device, torch.float32)
    distributed = _world(group) > 1
    if distributed:
        gathered = [torch.empty_like(w) for _ in range(_world(group))]
        dist.all_gather(gathered, w.contiguous(), group=group)
        ws = torch.cat(gathered)
    else:
        ws = w
    if ws.shape[0] < 2 or (ws.device.type != "meta" and int((ws > 0).sum()) < 2):
        return features.float().sum() * 0.0
    x = F.normalize(features.float(), dim=-1, eps=eps)
    if distributed:
        from torch.distributed.nn.functional import all_gather

        xs, first = torch.cat(all_gather(x, group=group)), dist.get_rank(group) * n
    else:
        xs, first = x, 0
    with torch.no_grad():
        sim = x @ xs.t()
        sim[:, ws <= 0] = -3.0  # below any cosine: never a neighbour
        rows = torch.arange(n, device=x.device)
        sim[rows, first + rows] = -3.0  # nor is a row its own
        nearest = sim.argmax(dim=1)
    per_row = -torch.log((x - xs[nearest]).norm(dim=-1) + eps)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def ema_update(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, one ``_foreach`` pass over local
    tensors (with FSDP2 both sides are shards of the same layout: no communication)."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    if not teacher:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

