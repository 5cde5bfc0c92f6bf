"""Every op's declared launch plan (``sapiens2/ops/launch_plans.py``) against what the op really
launches on the Triton backend: the op runs under the interpreter inside a ``LaunchRecorder``
(every Triton launch with the distinct bytes it loads and stores per tensor and its dot FLOPs, and
every ATen kernel), and the plan must list the same kernels in the same order, each reading and
writing the same tensors, the same numbers of bytes, and executing the same FLOPs."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import sapiens2.ops as ops  # noqa: E402
from launch_cases import cases  # noqa: E402
from sapiens2.bench.record import LaunchRecorder, label_storages  # noqa: E402
from sapiens2.ops.plan import plan_for, planned_ops  # noqa: E402

CASES = cases()


def _recorded(name, args):
    op = getattr(torch.ops.sapiens2, name).default
    with ops.use_backend("triton", strict=True), LaunchRecorder() as rec:
        out = op(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    named = {a.name: t for a, t in zip(op._schema.arguments, args) if isinstance(t, torch.Tensor)}
    named.update({f"out{i}": t for i, t in enumerate(outs)})
    labels = label_storages(rec.launches, named)
    return [(r, {labels[k]: b for k, b in r.reads.items()}, {labels[k]: b for k, b in r.writes.items()})
            for r in rec.launches]


def _canonical_scratch(launches):
    """Plan scratch labels renamed scratch0, scratch1, ... in order of first use (as the recorder names them)."""
    names = {}
    for ln in launches:
        for label, _ in ln.reads + ln.writes:
            if label.startswith("scratch:") and label not in names:
                names[label] = f"scratch{len(names)}"
    return lambda label: names.get(label, label)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_matches_recorded_launches(case):
    cid, name, args = case
    plan = plan_for(f"sapiens2::{name}", "triton")
    assert plan is not None, f"{name} has no Triton launch plan"
    planned = plan(*args).launches
    got = _recorded(name, args)
    ren = _canonical_scratch(planned)
    assert [ln.kernel for ln in planned] == [r.kernel for r, _, _ in got], cid
    for ln, (r, reads, writes) in zip(planned, got):
        want_r = {ren(k): b for k, b in ln.reads}
        want_w = {ren(k): b for k, b in ln.writes}
        if r.kernel.startswith("triton:"):
            assert want_r == reads, (cid, ln.kernel, "reads")
            assert want_w == writes, (cid, ln.kernel, "writes")
            assert ln.flops == r.flops, (cid, ln.kernel, "flops")
        else:  # an ATen kernel: the tensors it touches, and its bytes by the cost model's rule
            assert set(want_r) == set(reads) and set(want_w) == set(writes), (cid, ln.kernel)
            assert (ln.bytes_read, ln.bytes_written) == r.aten_bytes, (cid, ln.kernel)


def test_every_op_has_a_triton_plan_and_a_case():
    ops_with_triton = sorted(f"sapiens2::{op}" for op in ops.backend._IMPLS["triton"]
                             if op not in ("window_attention_backward_qkv",))
    planned = set(planned_ops("triton"))
    cased = {f"sapiens2::{name}" for _, name, _ in CASES}
    # the custom ops whose Triton implementation is another op's kernel (packed forms) are planned too
    every = {f"sapiens2::{n}" for n in dir(torch.ops.sapiens2) if not n.startswith("_")} & (
        set(ops_with_triton) | {"sapiens2::window_attention_qkv", "sapiens2::cls_pool_kv"})
    assert every <= planned, every - planned
    assert every <= cased, every - cased
