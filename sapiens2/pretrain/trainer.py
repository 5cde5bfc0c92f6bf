"""The pretraining loop: one optimizer step = views, teacher targets, one student pass, the joint
loss, backward, guard, clip, AdamW, EMA; checkpoints and logs around it.

Runs the same under ``sapiens2 pretrain`` (one process: a one-rank FSDP2 group) and under
``torchrun --nnodes M --nproc_per_node K -m sapiens2.pretrain``. Every random draw is a function of
``(seed, step, position in the global batch)``, the data position is the step, and the schedules
are arrays indexed by the step: resuming from checkpoint ``k`` continues exactly where step ``k``
left off, on the same or another number of ranks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import nvtx
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ..models import native_state_dict
from ..train import checkpoint as ckpt
from ..train.config import to_json
from ..train.data import ImageDataset, make_loader, open_source, rank_slice
from ..train.distributed import DistInfo, init_distributed, make_mesh, shutdown
from ..train.metrics import MetricsLog, plot_loss_curve, read_metrics
from ..train.optim import build_adamw, init_adamw_state, param_groups, set_step_values
from ..train.parallelize import apply_checkpointing, apply_compile, local_tensors, shard
from ..train.schedules import lr_schedule, warmup_constant, warmup_cosine
from .config import PretrainConfig
from .dino import ema_update, update_center
from .masking import random_visible_ids
from .objective import PretrainStudent, PretrainTeacher, joint_loss
from .views import CropSpec, multi_crop


class TrainingDiverged(RuntimeError):
    """The loss was not finite for ``max_bad_steps`` consecutive steps."""


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def build(cls, cfg: PretrainConfig) -> "Schedules":
        n, o, op = cfg.run.steps, cfg.objective, cfg.optim
        return cls(
            lr=lr_schedule(n, op.lr, op.min_lr, op.warmup_steps, op.schedule),
            wd=warmup_cosine(n, op.weight_decay, op.weight_decay_end, 0, op.weight_decay),
            momentum=warmup_cosine(n, o.momentum_start, o.momentum_end),  # DINO's teacher momentum, rising
            teacher_temp=warmup_constant(n, o.teacher_temp, o.teacher_temp_warmup_steps, o.warmup_teacher_temp),
        )


@dataclass
class RunResult:
    out: str
    steps_done: int
    last_losses: dict = field(default_factory=dict)
    skipped_images: int = 0


def layer_of(num_layers: int):
    """Layer index for layer-wise lr decay: embeddings/tokens/tokenizer 0, trunk block i -> i + 1,
    everything after the trunk (final norm, decoder, DINO head) num_layers + 1."""

    def f(name: str) -> int:
        if name.startswith("backbone.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("backbone.") and not name.startswith("backbone.ln1"):
            return 0
        return num_layers + 1

    return f


def _patch_embed_mult(mult: float):
    return lambda name: mult if name.startswith("backbone.patch_embed.") else 1.0


class Pretrainer:
    """Owns the networks, optimizer, schedules and data of one run."""

    def __init__(self, cfg: PretrainConfig, out: str, info: Optional[DistInfo] = None):
        self.cfg = cfg
        self.out = out
        self.info = info or init_distributed()
        cfg.validate(self.info.world_size)
        r = cfg.run
        if r.deterministic:
            from .. import ops

            # bitwise-repeatable steps on a GPU too: our attention backward without atomics, cuBLAS with a
            # fixed workspace, deterministic index ops (the decoder's scatter/gather backward)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            ops.set_deterministic(True)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = self.info.device
        self.mesh = make_mesh(self.info, r.hsdp, r.hsdp_shard_size)
        torch.manual_seed(r.seed)  # same initial weights on every rank, before sharding
        student = PretrainStudent(cfg)
        teacher = PretrainTeacher(cfg)
        self.patch_px = student.backbone.patch_size * student.backbone.window
        self.num_layers = len(student.backbone.blocks)
        for m_s, m_t in zip(student.ema_modules(), teacher.ema_modules()):
            m_t.load_state_dict(m_s.state_dict())
        teacher.requires_grad_(False)
        for m in (student, teacher):
            apply_checkpointing(m.backbone.blocks, r.activation_checkpointing if m is student else "none")
            if r.compile:
                apply_compile(m.backbone.blocks)
        student.to(self.device)
        teacher.to(self.device)
        self.student = shard(student, self._units(student), self.mesh, r.precision)
        self.teacher = shard(teacher, self._units(teacher), self.mesh, r.precision)
        self.optimizer = build_adamw(
            param_groups(self.student, cfg.optim, layer_of(self.num_layers), self.num_layers,
                         _patch_embed_mult(cfg.optim.patch_embed_lr_mult)), cfg.optim, self.device.type)
        init_adamw_state(self.optimizer)
        self.sched = Schedules.build(cfg)
        self.center = torch.zeros(1, cfg.objective.head_prototypes, device=self.device)
        self.step = 0
        self.skipped_images = 0
        self.bad_streak = 0
        d = cfg.data
        self.dataset = ImageDataset(open_source(d.source, synthetic_count=d.synthetic_count,
                                                synthetic_size=d.image_size, seed=r.seed), size=d.image_size)
        self._ema_pairs = (
            [p for m in self.teacher.ema_modules() for p in m.parameters()],
            [p for m in self.student.ema_modules() for p in m.parameters()],
        )

    @staticmethod
    def _units(m: nn.Module) -> list[nn.Module]:
        """FSDP2 units: each trunk block, the tokenizer, each decoder block, the DINO head."""
        units = list(m.backbone.blocks)
        if m.backbone.tokenizer is not None:
            units.append(m.backbone.tokenizer)
        if hasattr(m, "decoder"):
            units += list(m.decoder.blocks)
        units.append(m.dino_head)
        return units

    # ------------------------------------------------------------------------------------ state

    def state(self) -> dict:
        with native_state_dict():
            s_model, s_optim = get_state_dict(self.student, self.optimizer)
            t_model = get_model_state_dict(self.teacher)
        trainer = {"step": torch.tensor(self.step), "skipped_images": torch.tensor(self.skipped_images),
                   "bad_streak": torch.tensor(self.bad_streak), "center": self.center,
                   "torch_rng": torch.get_rng_state()}
        return {"student": s_model, "teacher": t_model, "optim": s_optim, "trainer": trainer}

    def save(self) -> str:
        r = self.cfg.run
        return ckpt.save(os.path.join(self.out, "checkpoints"), self.step, self.state(), r.keep_last, r.keep_every)

    def resume(self) -> Optional[int]:
        root = os.path.join(self.out, "checkpoints")
        step = ckpt.latest_step(root)
        if step is None:
            return None
        state = self.state()
        ckpt.load(root, step, state)
        with native_state_dict():
            set_state_dict(self.student, self.optimizer, model_state_dict=state["student"],
                           optim_state_dict=state["optim"])
            set_model_state_dict(self.teacher, state["teacher"])
        tr = state["trainer"]
        self.step = int(tr["step"])
        self.skipped_images = int(tr["skipped_images"])
        self.bad_streak = int(tr["bad_streak"])
        self.center.copy_(tr["center"])
        torch.set_rng_state(tr["torch_rng"])
        return step

    # ------------------------------------------------------------------------------------ one step

    def views(self, batch: dict):
        """Multi-crop views and masks of this rank's rows; sample identity = global batch position."""
        cfg, o = self.cfg, self.cfg.objective
        sl = rank_slice(cfg.run.global_batch, self.info.rank, self.info.world_size)
        images = batch["images"].to(self.device, non_blocking=True)
        ids = torch.arange(sl.start, sl.stop)
        step = batch["step"]
        g, loc = multi_crop(images, ids, global_spec=CropSpec(o.global_size, o.global_scale),
                            local_spec=CropSpec(o.local_size, o.local_scale), n_global=o.n_global,
                            n_local=o.n_local, seed=cfg.run.seed, step=step, flips=o.flips)
        th, tw = o.global_size[0] // self.patch_px, o.global_size[1] // self.patch_px
        vis = torch.cat([random_visible_ids(th * tw, o.mask_ratio, ids, seed=cfg.run.seed, step=step, view=v)
                         for v in range(o.n_global)]).to(self.device)
        weights = batch["valid"].to(self.device).float()
        return g, loc, vis, weights

    def train_step(self, batch: dict) -> dict:
        cfg, r, s = self.cfg, self.cfg.run, self.step
        with nvtx.annotate("views", color="blue"):
            g, loc, vis, weights = self.views(batch)
        temp = float(self.sched.teacher_temp[s])
        B = weights.shape[0]
        accum = r.grad_accum
        mb = B // accum
        terms: dict[str, float] = {}
        o = cfg.objective
        for a in range(accum):
            rows = slice(a * mb, (a + 1) * mb)
            gv = _view_rows(g, o.n_global, B, rows)
            lv = _view_rows(loc, o.n_local, B, rows)
            vv = _view_rows(vis, o.n_global, B, rows)
            self.student.set_requires_gradient_sync(a == accum - 1)
            with nvtx.annotate("teacher", color="green"), torch.no_grad():
                t_logits = self.teacher(gv)
            with nvtx.annotate("student_forward", color="orange"):
                pixels, s_logits, s_cls = self.student(gv, vv, lv)
                out = joint_loss(cfg, gv, vv, pixels, s_logits, t_logits, temp, self.patch_px, weights[rows],
                                 center=self.center if o.centering == "center" else None, student_cls=s_cls)
            out = self._inject(out)
            with nvtx.annotate("backward", color="red"):
                (out["loss"] / accum).backward()
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / accum
            if o.centering == "center":
                update_center(self.center, t_logits, o.center_momentum)
        return self._finish_step(terms)

    def _inject(self, out: dict) -> dict:
        """Hook for tests: replace loss terms (e.g. with NaN) to exercise the guard."""
        return out

    def _finish_step(self, terms: dict) -> dict:
        cfg, s = self.cfg, self.step
        terms = _mean_over_ranks(terms, self.device)
        bad = next((k for k in ("loss_mae", "loss_cl", "loss") if not math.isfinite(terms[k])), None)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak += 1
            if self.bad_streak >= cfg.run.max_bad_steps:
                raise TrainingDiverged(
                    f"step {s}: {bad} is {terms[bad]} for {self.bad_streak} consecutive steps "
                    f"(loss_mae={terms['loss_mae']}, loss_cl={terms['loss_cl']}); stopping. The last checkpoint is "
                    f"in {os.path.join(self.out, 'checkpoints')}: lower optim.lr or check the data, then --resume.")
            terms["grad_norm"] = float("nan")
            terms["skipped_step"] = True
        else:
            self.bad_streak = 0
            if s < cfg.objective.freeze_last_layer_steps:
                for p in self.student.dino_head.last_layer.parameters():
                    p.grad = None
            with nvtx.annotate("optimizer", color="purple"):
                params = [p for p in self.student.parameters() if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else
                                                      float("inf"), foreach=True)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                set_step_values(self.optimizer, float(self.sched.lr[s]), float(self.sched.wd[s]))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            with nvtx.annotate("ema", color="yellow"):
                ema_update(local_tensors(self._ema_pairs[0]), local_tensors(self._ema_pairs[1]),
                           float(self.sched.momentum[s]))
            terms["grad_norm"] = float(norm)
        self.step += 1
        return terms

    # ------------------------------------------------------------------------------------ the run

    def fit(self, resume: bool = False, export: Optional[str] = "teacher", inject=None) -> RunResult:
        cfg, r, info = self.cfg, self.cfg.run, self.info
        if inject is not None:
            self._inject = inject
        start = 0
        if resume:
            got = self.resume()
            start = got or 0
            if info.is_main:
                print(f"resuming from step {start}" if got is not None else "no checkpoint found: starting at step 0")
        if info.is_main:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                f.write(to_json(cfg))
        log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_step=start, enabled=info.is_main)
        remaining = r.steps - start
        loader = make_loader(self.dataset, global_batch=r.global_batch, rank=info.rank,
                             world_size=info.world_size, start_step=start, num_steps=max(remaining, 0),
                             seed=r.seed, num_workers=cfg.data.num_workers)
        bar = _progress(remaining, start, info.is_main and r.progress)
        flops_per_step = None
        peak = _peak_flops(self.device)
        last: dict = {}
        t_prev = time.perf_counter()
        for batch in loader:
            if flops_per_step is None and peak is not None:
                flops_per_step = self._count_flops(batch)
            terms = self.train_step(batch)
            skipped = _sum_over_ranks(int((~batch["valid"]).sum()), self.device)
            self.skipped_images += skipped
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t_now = time.perf_counter()
            dt, t_prev = t_now - t_prev, t_now
            s = self.step - 1
            row = {"step": s, "loss": terms["loss"], "loss_mae": terms["loss_mae"], "loss_cl": terms["loss_cl"],
                   "loss_cl_global": terms.get("loss_cl_global"), "loss_cl_local": terms.get("loss_cl_local"),
                   "loss_koleo": terms.get("loss_koleo"), "lr": float(self.sched.lr[s]), "wd": float(self.sched.wd[s]),
                   "momentum": float(self.sched.momentum[s]), "teacher_temp": float(self.sched.teacher_temp[s]),
                   "grad_norm": terms["grad_norm"], "images_per_s": r.global_batch / dt, "step_s": dt,
                   "skipped_images": self.skipped_images}
            if flops_per_step is not None:
                row["mfu"] = flops_per_step * info.world_size / (dt * info.world_size * peak)
            if self.device.type == "cuda":
                row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1024**3
            log.write(row)
            last = row
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", mae=f"{row['loss_mae']:.4f}", cl=f"{row['loss_cl']:.3f}")
            elif info.is_main and (s % r.log_every == 0 or self.step == r.steps):
                print(f"step {s:>6}  loss {row['loss']:.4f}  mae {row['loss_mae']:.4f}  cl {row['loss_cl']:.4f}  "
                      f"lr {row['lr']:.2e}  {row['images_per_s']:.1f} img/s", flush=True)
            if self.step % r.checkpoint_every == 0 or self.step == r.steps:
                with nvtx.annotate("checkpoint", color="gray"):
                    self.save()
        if bar is not None:
            bar.close()
        if info.is_main:
            rows = read_metrics(os.path.join(self.out, "metrics.jsonl"))
            if rows:
                try:
                    plot_loss_curve(rows, os.path.join(self.out, "loss_curve.png"),
                                    title=f"sapiens2 pretrain ({cfg.preset})")
                except ImportError as e:
                    print(f"loss curve not written: {e}")
        if export:
            self.export(export, os.path.join(self.out, f"backbone_{export}.safetensors"))
        return RunResult(self.out, self.step, last, self.skipped_images)

    def _count_flops(self, batch: dict) -> Optional[int]:
        """Model FLOPs of one optimizer step on this rank (student fwd + bwd, teacher fwd), counted once
        with ``FlopCounterMode`` on the first batch (the custom ops register their formulas)."""
        from torch.utils.flop_counter import FlopCounterMode

        g, loc, vis, w = self.views(batch)
        counter = FlopCounterMode(display=False)
        with counter:
            with torch.no_grad():
                t = self.teacher(g)
            px, lg, cls = self.student(g, vis, loc)
            out = joint_loss(self.cfg, g, vis, px, lg, t, 0.07, self.patch_px, w, student_cls=cls)
            out["loss"].backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def export(self, which: str, path: str) -> Optional[str]:
        """The student's or teacher's backbone as ``.safetensors`` in the official key layout (rank 0)."""
        from safetensors.torch import save_file

        from ..models.backbone import Sapiens2Backbone

        if which not in ("student", "teacher"):
            raise ValueError(f"export must be 'student' or 'teacher', got {which!r}")
        net = self.student if which == "student" else self.teacher
        with native_state_dict():
            full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        sd = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
        sd = {k.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): v for k, v in sd.items()}
        m = self.cfg.model
        bb = Sapiens2Backbone(m.arch_config(), img_size=self.cfg.objective.global_size, patch_size=m.patch_size,
                              use_tokenizer=m.use_tokenizer, device="meta")
        bb.to_empty(device="cpu")
        with native_state_dict():
            bb.load_state_dict(sd, strict=True)
        official = {k: v.detach().contiguous().clone() for k, v in bb.state_dict().items()}
        save_file(official, path, metadata={"format": "pt", "source": f"sapiens2 pretrain ({which})"})
        return path

def _view_rows(x: torch.Tensor, views: int, B: int, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of every view of a view-major ``(views * B, ...)`` tensor, still view-major."""
    if views == 0:
        return x
    return x.view(views, B, *x.shape[1:])[:, rows].flatten(0, 1)


def _mean_over_ranks(terms: dict, device) -> dict:
    keys = sorted(terms)
    t = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _sum_over_ranks(n: int, device) -> int:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def _peak_flops(device) -> Optional[float]:
    if device.type != "cuda":
        return None
    from ..bench.device import detect

    props = torch.cuda.get_device_properties(device)
    peak = detect(props.name, props.multi_processor_count)
    return peak.bf16_flops if peak else None


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=0, desc=f"pretrain (from step {start})", dynamic_ncols=True, mininterval=1.0)


def run_pretrain(cfg: PretrainConfig, out: str, resume: bool = False, export: Optional[str] = "teacher",
                 inject=None) -> RunResult:
    """Train (joining torchrun's group, or as a one-rank group) and leave the process as it was."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))  # config errors before any group or model exists
    from ..ops import determinism

    info = init_distributed()
    torch_det, ops_det = torch.are_deterministic_algorithms_enabled(), determinism._setting
    try:
        return Pretrainer(cfg, out, info).fit(resume=resume, export=export, inject=inject)
    finally:
        shutdown(info)
        torch.use_deterministic_algorithms(torch_det)  # run.deterministic does not outlive the run
        determinism.set_deterministic(ops_det)
