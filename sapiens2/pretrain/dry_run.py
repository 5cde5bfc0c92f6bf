"""``sapiens2 pretrain --dry-run``: a per-GPU memory plan and a predicted throughput for FSDP2 full
sharding, without allocating the model (everything is measured on the meta device).

Memory per GPU (bytes):

* student state: fp32 master parameters + fp32 gradients + AdamW's two fp32 moments = 16 B per
  student parameter (backbone, MAE decoder, DINO head), / GPUs;
* teacher: its fp32 shard, 4 B per teacher parameter (backbone + DINO head), / GPUs;
* gathered parameters: the bf16 copies of the two largest FSDP2 units in flight (the unit computing
  and the one prefetched; units as the trainer shards them: each trunk block, the tokenizer, each
  decoder block, the DINO head, and the root's remainder);
* gradient reduce-scatter buffer: the largest unit's unsharded gradients in bf16 plus their fp32
  copy for the fp32 reduce-scatter (6 B per parameter of that unit);
* activations kept for backward, per image (micro-batch 1: all its views), measured with
  ``sizing.saved_bytes`` (checkpointed blocks' held inputs included) on the student's forward + joint loss in bf16,
  once without checkpointing and once with ``apply_checkpointing(student.backbone.blocks, "full")``;
  with checkpointing the figure is what stays outside the checkpointed blocks plus each block's
  inputs, plus the activations of one block while it is recomputed in backward (the largest
  block's, measured alone); scaled linearly with the micro-batch;
* a fixed reserve of 4 GiB for the CUDA context, NCCL buffers, allocator fragmentation and the
  transient tensors not counted above (the teacher's no-grad forward, gradients in flight).

The largest micro-batch (images per GPU per micro-step) is the largest ``m`` with
``fixed + m x activations <= gpu_mem_gib``. The micro-batch used is the largest divisor of the
per-GPU batch (``run.global_batch / gpus``) that fits, the rest becomes gradient accumulation
(``run.grad_accum``).

Time per optimizer step and GPU:

* compute per image: the H100 SXM roofline time of our step (``sapiens2.bench.pretrain_cost``:
  student forward + backward, teacher forward; every kernel at max(FLOPs / 989.4 TFLOP/s,
  bytes / 3.35 TB/s), no launch gaps: an *upper bound* on speed), measured at micro-batch 1 and
  scaled linearly (weights are re-read per image: slightly pessimistic for larger micro-batches);
  with checkpointing the recomputed forward of the blocks is counted in the backward;
* communication (ring collectives, (g-1)/g of the full size per GPU): per micro-step the bf16
  all-gathers of the student's parameters for its forward and again for its backward
  (``reshard_after_forward=True``) and of the teacher's for its forward; per optimizer step the
  fp32 reduce-scatter of the student's gradients (only the last micro-step syncs). Bandwidth 450
  GB/s per GPU within a node (8 GPUs, NVLink), 50 GB/s per GPU across nodes (400 Gb/s InfiniBand),
  the slower link bounding a flat ring when the job spans nodes;
* overlapped: each micro-step takes max(compute, its communication); the optimizer update and the
  EMA (fused AdamW 28 B + gradient-norm read 4 B per student parameter, EMA 12 B per teacher
  parameter, on the local shard at HBM speed) follow the last reduce-scatter, not overlapped;
* images/s = gpus x micro-batch x accumulation / step time; MFU = model FLOPs of those images
  (``FlopCounterMode``, no recompute) / (step time x GPUs x 989.4 TFLOP/s).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, astuple, dataclass

import torch

GIB = 1024 ** 3
RESERVE_GIB = 4.0
GPUS_PER_NODE = 8
INTRA_NODE_BPS = 450e9  # bytes/s per GPU, NVLink
INTER_NODE_BPS = 50e9  # bytes/s per GPU, 400 Gb/s InfiniBand
STATE_B = 16  # fp32 params + grads + 2 AdamW moments
TEACHER_B = 4
GATHER_B = 2  # bf16 all-gathered parameters
RS_BUFFER_B = 6  # one unit's bf16 gradients + fp32 copy for the reduce-scatter
OPT_B = 28 + 4  # fused AdamW (read p, g, m, v; write p, m, v) + gradient-norm read, per student param
EMA_B = 12  # read teacher + student, write teacher, per teacher param
MODES = ("none", "full")

ASSUMPTIONS = [
    "FSDP2 full sharding over all GPUs; student state fp32 params + grads + AdamW moments = 16 B/param / GPUs; "
    "teacher fp32 shard 4 B/param / GPUs",
    "gathered bf16 params of the two largest FSDP2 units in flight; reduce-scatter buffer 6 B/param of the "
    "largest unit",
    f"reserve {RESERVE_GIB:.0f} GiB per GPU for CUDA context, NCCL, allocator fragmentation, uncounted transients",
    "activations kept for backward measured on the meta device (bf16, micro-batch 1, all views of one image), "
    "scaled linearly with the micro-batch; full checkpointing adds one block's recompute",
    "compute = H100 SXM roofline time of our step (989.4 TFLOP/s, 3.35 TB/s, no launch gaps): an upper bound on "
    "speed; checkpointing's recompute included",
    "comm per GPU: ring all-gathers of bf16 params (student fwd + bwd, teacher fwd) every micro-step, fp32 "
    "reduce-scatter of grads once per optimizer step; 450 GB/s within a node (<= 8 GPUs), 50 GB/s across nodes",
    "compute and communication overlap (step = max per micro-step); optimizer + EMA at HBM speed, not overlapped",
    "micro-batch used = largest divisor of global_batch / gpus that fits; the rest is gradient accumulation",
]

_CACHE: dict = {}


@dataclass(frozen=True)
class StepMeasurement:
    """Per-image figures of one configuration's step, measured once on the meta device."""

    params_student: int
    params_teacher: int
    units: tuple  # parameter counts of the FSDP2 units (student and teacher), largest first
    act_none: int  # bytes kept for backward per image, no checkpointing
    act_full_kept: int  # ... with full checkpointing: outside the blocks + the blocks' inputs
    recompute_peak: int  # one block's activations while it is recomputed (largest block)
    t_none: float  # roofline seconds per image
    t_full: float
    model_flops: int  # per image (FlopCounterMode)
    seconds: float  # how long measuring took

    @property
    def act_full(self) -> int:
        return self.act_full_kept + self.recompute_peak


def _units(model, is_student: bool) -> list[int]:
    """Parameter counts of the trainer's FSDP2 units (``Pretrainer._units``) plus the root's remainder."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    bb = model.backbone
    units = [count(b) for b in bb.blocks]
    if bb.tokenizer is not None:
        units.append(count(bb.tokenizer))
    if is_student:
        units += [count(b) for b in model.decoder.blocks]
    units.append(count(model.dino_head))
    units.append(count(model) - sum(units))
    return units


def _key(cfg) -> tuple:
    return astuple(cfg.model) + astuple(cfg.objective)


def measure_step(cfg) -> StepMeasurement:
    """The per-image measurements of ``cfg``'s step (cached per model + objective config)."""
    key = _key(cfg)
    if key in _CACHE:
        return _CACHE[key]
    from ..bench.pretrain_cost import build_ours, ours_step, step_inputs
    from ..bench.sizing import saved_bytes
    from ..train.parallelize import apply_checkpointing
    from .objective import joint_loss

    t0 = time.perf_counter()
    none = ours_step(cfg, 1, "none", parts=False, flops=True)
    full = ours_step(cfg, 1, "full", parts=False, flops=False)

    student, teacher = build_ours(cfg)
    units = sorted(_units(student, True) + _units(teacher, False), reverse=True)
    apply_checkpointing(student.backbone.blocks, "full")
    blocks = list(student.backbone.blocks)
    bb = student.backbone
    x = step_inputs(cfg, bb.patch_size * bb.window, 1)
    params = list(student.parameters())
    captured: dict[int, tuple] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: captured.__setitem__(i, (a, k)), with_kwargs=True)
             for i, b in enumerate(blocks)]

    def step():
        px, lg, cls = student(x.g, x.vis, x.loc)
        return joint_loss(cfg, x.g, x.vis, px, lg, x.t_logits, cfg.objective.teacher_temp, x.patch_px,
                          center=x.center, student_cls=cls)["loss"]

    try:
        kept_full = saved_bytes(step, params, checkpointed=tuple(blocks))
    finally:
        for h in hooks:
            h.remove()
    # one block recomputed in backward: its activations (not its inputs, counted above)
    peak = 0
    picks = {0, len(blocks) - 1} | ({bb.arch.gqa_layers()[0]} if bb.arch.gqa_layers() else set())
    for i in sorted(picks):
        args, kwargs = captured[i]
        inner = getattr(blocks[i], "_checkpoint_wrapped_module", blocks[i])
        fresh = [torch.empty(a.shape, device="meta", dtype=a.dtype, requires_grad=True)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        tensors = [t for a in fresh for t in (a if isinstance(a, (tuple, list)) else (a,))
                   if isinstance(t, torch.Tensor)]
        peak = max(peak, saved_bytes(lambda: inner(*fresh, **kwargs), [*inner.parameters(), *tensors]))

    m = StepMeasurement(
        params_student=sum(p.numel() for p in student.parameters()),
        params_teacher=sum(p.numel() for p in teacher.parameters()),
        units=tuple(units), act_none=none.student.saved_bytes, act_full_kept=kept_full, recompute_peak=peak,
        t_none=none.total.roofline_s, t_full=full.total.roofline_s, model_flops=none.model_flops,
        seconds=time.perf_counter() - t0)
    _CACHE[key] = m
    return m


def _check(gpus, gpu_mem_gib) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be an integer >= 1, got {gpus!r}")
    if isinstance(gpu_mem_gib, bool) or not isinstance(gpu_mem_gib, (int, float)) or not math.isfinite(gpu_mem_gib) \
            or gpu_mem_gib <= 0:
        raise ValueError(f"gpu_mem_gib must be a positive number, got {gpu_mem_gib!r}")


def _largest_divisor(n: int, cap: int) -> int:
    return max((d for d in range(1, min(n, cap) + 1) if n % d == 0), default=0)


def dry_run(cfg, gpus: int, gpu_mem_gib: float = 80.0) -> dict:
    """The memory plan and predicted throughput of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gib`` GiB each
    (see the module docstring for every assumption). Allocates nothing."""
    from ..bench.device import H100_SXM

    _check(gpus, gpu_mem_gib)
    cfg.validate(1)
    m = measure_step(cfg)
    g = gpus
    P_s, P_t = m.params_student, m.params_teacher
    fixed = {
        "student_state": STATE_B * P_s / g,
        "teacher_shard": TEACHER_B * P_t / g,
        "gathered_params": GATHER_B * sum(m.units[:2]),
        "grad_buffer": RS_BUFFER_B * m.units[0],
        "reserve": RESERVE_GIB * GIB,
    }
    fixed_total = sum(fixed.values())
    cap = gpu_mem_gib * GIB
    frac = (g - 1) / g
    bw = INTRA_NODE_BPS if g <= GPUS_PER_NODE else INTER_NODE_BPS
    ag_s = frac * GATHER_B * (2 * P_s + P_t) / bw  # per micro-step
    rs_s = frac * 4 * P_s / bw  # per optimizer step
    opt_s = (OPT_B * P_s + EMA_B * P_t) / g / H100_SXM.hbm_bytes_per_s
    gb = cfg.run.global_batch
    per_gpu = gb // g if gb % g == 0 else 0
    modes = {}
    for mode in MODES:
        act = m.act_none if mode == "none" else m.act_full
        t_img = m.t_none if mode == "none" else m.t_full
        mb_fit = max(0, int((cap - fixed_total) // act)) if cap > fixed_total else 0
        note = ""
        if mb_fit == 0:
            note = "does not fit"
            mb, accum = 0, 0
        elif per_gpu:
            mb = _largest_divisor(per_gpu, mb_fit)
            accum = per_gpu // mb
        else:
            mb, accum = mb_fit, 1
            note = f"global batch {gb} is not a multiple of {g} GPUs: one micro-step of {mb_fit} per GPU"
        r = {"activations_per_image": act, "max_micro_batch": mb_fit, "micro_batch": mb, "grad_accum": accum,
             "memory": fixed_total + mb * act, "compute_per_micro_step_s": mb * t_img,
             "allgather_per_micro_step_s": ag_s, "reduce_scatter_s": rs_s, "optimizer_ema_s": opt_s, "note": note}
        if mb:
            c = mb * t_img
            step = (accum - 1) * max(c, ag_s) + max(c, ag_s + rs_s) + opt_s
            images = g * mb * accum
            r.update(step_s=step, images_per_s=images / step,
                     mfu=images * m.model_flops / (step * g * H100_SXM.bf16_flops),
                     bound="compute" if c >= ag_s + rs_s / accum else "communication")
        else:
            r.update(step_s=None, images_per_s=0.0, mfu=None, bound=None)
        modes[mode] = r
    return {"gpus": g, "gpu_mem_gib": float(gpu_mem_gib), "nodes": math.ceil(g / GPUS_PER_NODE),
            "link_bytes_per_s": bw, "global_batch": gb, "config_checkpointing": cfg.run.activation_checkpointing,
            "fixed": fixed, "fixed_total": fixed_total, "modes": modes, "measured": asdict(m),
            "assumptions": list(ASSUMPTIONS)}


def _gib(v) -> str:
    return f"{v / GIB:.3g}"


def _ms(v) -> str:
    x = v * 1e3
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_plan(cfg, plans: list[dict]) -> str:
    """The plans of ``dry_run`` for several GPU counts, side by side, with every assumption."""
    if not plans:
        return "no plans"
    o = cfg.objective
    meas = plans[0]["measured"]
    (Hg, Wg), (Hl, Wl) = o.global_size, o.local_size
    lines = [
        f"sapiens2 pretrain --dry-run: preset {cfg.preset} ({cfg.model.arch}), global batch {cfg.run.global_batch} "
        f"images, config checkpointing '{cfg.run.activation_checkpointing}'",
        f"per image: {o.n_global} global views {Hg}x{Wg} ({o.mask_ratio:.0%} masked) + {o.n_local} local views "
        f"{Hl}x{Wl}; teacher on the unmasked globals; decoder {o.decoder_width}/{o.decoder_depth}/{o.decoder_heads}, "
        f"DINO head {o.head_prototypes} prototypes",
        f"parameters: student {meas['params_student'] / 1e6:.6g} M (backbone + decoder + head), teacher "
        f"{meas['params_teacher'] / 1e6:.6g} M; largest FSDP2 units {meas['units'][0] / 1e6:.4g} M, "
        f"{meas['units'][1] / 1e6:.4g} M params",
        f"measured per image on the meta device (bf16, {meas['seconds']:.1f} s): kept for backward "
        f"{_gib(meas['act_none'])} GiB without checkpointing, {_gib(meas['act_full_kept'] + meas['recompute_peak'])} "
        f"GiB with full checkpointing ({_gib(meas['act_full_kept'])} kept + {_gib(meas['recompute_peak'])} one "
        f"block's recompute); H100 roofline {_ms(meas['t_none'])} ms ({_ms(meas['t_full'])} ms with the "
        f"recompute); model FLOPs {meas['model_flops'] / 1e12:.4g} T",
    ]
    if cfg.run.precision != "bf16":
        lines.append(f"note: run.precision is {cfg.run.precision!r}; this plan assumes bf16 compute (FSDP2 mixed "
                     "precision) throughout")
    lines.append("")
    cols = [(p, mode) for p in plans for mode in MODES]
    head = f"{'per GPU':<44}" + "".join(
        f"{str(p['gpus']) + ' GPUs, ' + mode + ('*' if mode == cfg.run.activation_checkpointing else ''):>18}"
        for p, mode in cols)
    lines.append(head)

    def row(name, fn):
        lines.append(f"{name:<44}" + "".join(f"{fn(p, p['modes'][mode]):>18}" for p, mode in cols))

    row("student fp32 params+grads+AdamW (GiB)", lambda p, r: _gib(p["fixed"]["student_state"]))
    row("teacher fp32 shard (GiB)", lambda p, r: _gib(p["fixed"]["teacher_shard"]))
    row("gathered bf16 params, 2 units (GiB)", lambda p, r: _gib(p["fixed"]["gathered_params"]))
    row("grad reduce-scatter buffer (GiB)", lambda p, r: _gib(p["fixed"]["grad_buffer"]))
    row("reserve (GiB)", lambda p, r: _gib(p["fixed"]["reserve"]))
    row("fixed total (GiB)", lambda p, r: _gib(p["fixed_total"]))
    row("activations per image (GiB)", lambda p, r: _gib(r["activations_per_image"]))
    row("largest micro-batch that fits", lambda p, r: f"{r['max_micro_batch']} in {p['gpu_mem_gib']:.0f} GiB")
    row("micro-batch used x grad accumulation",
        lambda p, r: f"{r['micro_batch']} x {r['grad_accum']}" if r["micro_batch"] else "-")
    row("memory at that micro-batch (GiB)", lambda p, r: _gib(r["memory"]) if r["micro_batch"] else "-")
    row("compute per micro-step (ms)", lambda p, r: _ms(r["compute_per_micro_step_s"]) if r["micro_batch"]
        else "-")
    row("all-gathers per micro-step (ms)", lambda p, r: _ms(r["allgather_per_micro_step_s"]))
    row("reduce-scatter per optimizer step (ms)", lambda p, r: _ms(r["reduce_scatter_s"]))
    row("optimizer + EMA per step (ms)", lambda p, r: _ms(r["optimizer_ema_s"]))
    row("optimizer step time (s)", lambda p, r: f"{r['step_s']:.3g}" if r["step_s"] else "-")
    row("bound by", lambda p, r: r["bound"] or "-")
    row("images/s (all GPUs)", lambda p, r: f"{r['images_per_s']:.1f}")
    row("MFU at that rate", lambda p, r: f"{r['mfu']:.3f}" if r["mfu"] is not None else "-")
    notes = [f"{p['gpus']} GPUs, {mode}: {p['modes'][mode]['note']}" for p, mode in cols if p["modes"][mode]["note"]]
    if notes:
        lines += [""] + notes
    lines += ["", "(* the config's run.activation_checkpointing)", "assumptions:"]
    lines += [f"  - {a}" for a in plans[0]["assumptions"]]
    return "\n".join(lines)


__all__ = ["dry_run", "format_plan", "measure_step", "StepMeasurement", "ASSUMPTIONS", "RESERVE_GIB"]
