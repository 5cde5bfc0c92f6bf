"""The pretraining-step cost table (``sapiens2 bench cost --stage pretrain``) and the FSDP2 dry run
(``sapiens2 pretrain --dry-run``), on small configurations (meta device only)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sapiens2.bench.pretrain_cost import (PARTS, format_table, ours_step, pretrain_config, pretrain_costs,
                                          step_inputs, verdict)
from sapiens2.bench.sizing import saved_bytes
from sapiens2.pretrain.config import ModelConfig, get_preset
from sapiens2.pretrain.dry_run import dry_run, format_plan, measure_step


def _small():
    """3 layers (MHA, GQA, MHA), patch 16, 128x96 globals (48 tokens, 12 visible) and 64x48 locals."""
    cfg = pretrain_config("sapiens2_0.1b", (128, 96), n_local=4, decoder=(64, 1, 4), head=(256, 128, 32))
    cfg.model = ModelConfig(arch="small", embed_dims=64, num_layers=3, num_heads=4, mha_early=1, mha_late=1)
    return cfg


@pytest.fixture(scope="module")
def small_costs():
    return pretrain_costs(cfg=_small())


def test_table_runs_and_compares_the_same_model(small_costs):
    ours, base = small_costs
    assert ours.params == base.params  # the same networks, written two ways
    text = format_table(ours, base)
    for row in ("model FLOPs", "bytes moved", "kernel launches", "bytes kept for backward", "roofline step time",
                "MFU", *PARTS, "target predicted step time", "target bytes kept"):
        assert row in text
    a, b = ours.summary(), base.summary()
    for s in (a, b):
        assert s["roofline_s"] > 0 and s["saved_bytes"] > 0 and 0 < s["mfu"] < 1
        assert s["roofline_s"] == pytest.approx(s["teacher_roofline_s"] + s["student_roofline_s"])
    v = verdict(ours, base)
    assert set(v) == {"roofline_s", "saved_bytes"}
    assert v["roofline_s"]["ratio"] == pytest.approx(a["roofline_s"] / b["roofline_s"])
    # the teacher keeps nothing; each part's measurement is alone, and they add up to about the whole
    assert ours.teacher.saved_bytes == 0 and base.teacher.saved_bytes == 0
    for side in (ours, base):
        parts_t = sum(side.parts[p].roofline_s for p in PARTS)
        assert parts_t == pytest.approx(side.summary()["roofline_s"], rel=0.02)


def test_baseline_flops_differ_only_by_the_masked_patch_conv(small_costs):
    """Same matmuls, except that the baseline embeds every patch of a masked global view (conv forward and
    weight gradient) where ours embeds the visible ones."""
    ours, base = small_costs
    cfg = _small()
    o = cfg.objective
    n, K, C, p = 8 * 6, 12, 64, 16
    assert base.model_flops - ours.model_flops == 4 * (n - K) * 3 * p * p * C * o.n_global


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_ours_flops_equal_flop_counter_mode_of_the_trainer_step(preset):
    """The step as the trainer runs it (teacher under no_grad, student, joint loss, loss.backward()),
    counted by FlopCounterMode, against the table's model FLOPs; the cost counter's own FLOPs of the
    ATen matmuls are the same numbers (only the attention kernels count at their tiles)."""
    from sapiens2.bench.pretrain_cost import build_ours
    from sapiens2.pretrain.objective import joint_loss

    cfg = get_preset("tiny") if preset == "tiny" else _small()
    rep = ours_step(cfg, batch=2, parts=False)
    student, teacher = build_ours(cfg)
    bb = student.backbone
    x = step_inputs(cfg, bb.patch_size * bb.window, 2)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            t_logits = teacher(x.g)
        pixels, logits, cls = student(x.g, x.vis, x.loc)
        out = joint_loss(cfg, x.g, x.vis, pixels, logits, t_logits, 0.07, x.patch_px, student_cls=cls)
        out["loss"].backward()
    assert rep.model_flops == counter.get_total_flops() > 0
    aten = {str(k): v for k, v in counter.get_flop_counts()["Global"].items() if str(k).startswith("aten.")}
    counted: dict = {}
    for o in rep.total.ops:
        if o.name.startswith("aten.") and o.flops:
            counted[o.name] = counted.get(o.name, 0) + o.flops
    assert counted == aten
    assert rep.total.flops >= rep.model_flops


def test_kept_bytes_with_checkpointing_below_without():
    cfg = get_preset("tiny")
    m = measure_step(cfg)
    assert 0 < m.act_full < m.act_none
    assert 0 < m.recompute_peak < m.act_none
    assert m.t_full > m.t_none  # the recomputed forward is counted in the backward
    # without checkpointing the dry-run's figure is saved_bytes of the plain step
    from sapiens2.bench.pretrain_cost import build_ours
    from sapiens2.pretrain.objective import joint_loss

    student, _ = build_ours(cfg)
    bb = student.backbone
    x = step_inputs(cfg, bb.patch_size * bb.window)

    def step():
        px, lg, cls = student(x.g, x.vis, x.loc)
        return joint_loss(cfg, x.g, x.vis, px, lg, x.t_logits, 0.07, x.patch_px, student_cls=cls)["loss"]

    assert saved_bytes(step, student.parameters()) == m.act_none
    assert measure_step(cfg) is m  # cached per config


def test_dry_run_micro_batch_monotone_in_memory():
    cfg = get_preset("tiny")
    m = measure_step(cfg)
    fixed = dry_run(cfg, 2, 100.0)["fixed_total"] / 1024 ** 3
    # from "does not fit" up to many images, around the fixed memory
    mems = [fixed * 0.9, fixed + 0.5 * m.act_full / 1024 ** 3, fixed + 3.5 * m.act_none / 1024 ** 3, fixed + 0.05,
            fixed + 1, 40.0, 80.0, 141.0]
    mems.sort()
    last = {"none": -1, "full": -1}
    for mem in mems:
        plan = dry_run(cfg, 2, mem)
        for mode, r in plan["modes"].items():
            assert r["max_micro_batch"] >= last[mode]
            last[mode] = r["max_micro_batch"]
            if r["micro_batch"]:
                assert r["memory"] <= mem * 1024 ** 3
                assert r["micro_batch"] * r["grad_accum"] * 2 == cfg.run.global_batch
                assert r["images_per_s"] > 0
            else:
                assert r["images_per_s"] == 0
        assert plan["modes"]["full"]["max_micro_batch"] >= plan["modes"]["none"]["max_micro_batch"]
    assert dry_run(cfg, 2, mems[0])["modes"]["none"]["max_micro_batch"] == 0
    assert last["none"] > 0


def test_dry_run_plan_text_states_its_assumptions():
    cfg = get_preset("tiny")
    plans = [dry_run(cfg, g) for g in (1, 8, 16)]
    text = format_plan(cfg, plans)
    for s in ("reserve", "16 B/param", "450 GB/s", "50 GB/s", "roofline", "largest micro-batch", "images/s",
              "1 GPUs, none", "16 GPUs, full"):
        assert s in text
    assert plans[0]["modes"]["none"]["allgather_per_micro_step_s"] == 0  # one GPU: nothing to gather
    assert plans[2]["link_bytes_per_s"] < plans[1]["link_bytes_per_s"]  # across nodes


@pytest.mark.parametrize("gpus, mem", [(0, 80.0), (-8, 80.0), (1.5, 80.0), (True, 80.0), ("8", 80.0),
                                       (8, 0.0), (8, -1.0), (8, math.nan), (8, math.inf)])
def test_dry_run_rejects_bad_inputs(gpus, mem):
    with pytest.raises(ValueError):
        dry_run(get_preset("tiny"), gpus, mem)


def test_cli_commands(capsys):
    from sapiens2.cli import main

    assert main(["bench", "cost", "--stage", "pretrain", "--arch", "sapiens2_0.1b", "--img", "128", "96"]) == 0
    out = capsys.readouterr().out
    assert "sapiens2_0.1b pretraining step" in out and "target predicted step time" in out
    assert main(["pretrain", "--preset", "tiny", "--dry-run", "--gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 GPUs, full" in out and "assumptions" in out
