"""Every op's declared launch plan against what the op really launches.

Triton backend (``sapiens2/ops/launch_plans.py``): the op runs under the interpreter inside a
``LaunchRecorder`` (every Triton launch with the distinct bytes it loads and stores per tensor and
its dot FLOPs, and every ATen kernel), and the plan must list the same kernels in the same order,
each reading and writing the same tensors, the same numbers of bytes, and executing the same FLOPs.

CUDA backend (``sapiens2/ops/launch_plans_cuda.py``): the op runs its hand-written kernels under the
CPU emulation, whose launch log gives each kernel and the distinct bytes it reads and writes by
address; the plan must match kernel for kernel and byte for byte (FLOPs are not recorded there)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import sapiens2.ops as ops  # noqa: E402
from launch_cases import cases  # noqa: E402
from sapiens2.bench.record import LaunchRecorder, label_storages  # noqa: E402
from sapiens2.ops.plan import plan_for, planned_ops  # noqa: E402

CASES = cases()


def _recorded(name, args, backend="triton"):
    op = getattr(torch.ops.sapiens2, name).default
    with ops.use_backend(backend, strict=True), LaunchRecorder() as rec:
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


# ---------------------------------------------------------------------------------------------- CUDA (emulated)

CUDA_OPS = set(ops.backend._IMPLS["cuda"]) | {"window_attention_qkv", "cls_pool_kv"}
CUDA_CASES = [c for c in CASES if c[1] in CUDA_OPS]


def _scratch_by_use(launches):
    """Scratch labels renamed by how they are used (which launches touch them, reading or writing how
    many bytes), so that naming does not depend on the order of the recorded buffers' addresses."""
    uses: dict = {}
    for i, (kernel, reads, writes) in enumerate(launches):
        for kind, group in (("r", reads), ("w", writes)):
            for label, b in group.items():
                if str(label).startswith("scratch"):  # an ATen kernel's bytes are compared per launch below
                    uses.setdefault(label, []).append((i, kind, b if kernel.startswith("cuda:") else -1))
    order = sorted(uses, key=lambda label: uses[label])
    return [({f"scratch{order.index(k)}" if k in uses else k: b for k, b in reads.items()},
             {f"scratch{order.index(k)}" if k in uses else k: b for k, b in writes.items()})
            for _, reads, writes in launches]


@pytest.fixture(scope="module")
def emulation():
    from sapiens2.cuda_tools import emu
    from sapiens2.ops.cuda import emulated

    try:
        with emulated():
            yield
    except emu.EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_plan_matches_emulated_launches(case, emulation):
    cid, name, args = case
    plan = plan_for(f"sapiens2::{name}", "cuda")
    assert plan is not None, f"{name} has no CUDA launch plan"
    planned = plan(*args).launches
    got = _recorded(name, args, "cuda")
    assert [ln.kernel for ln in planned] == [r.kernel for r, _, _ in got], cid
    want = _scratch_by_use([(ln.kernel, dict(ln.reads), dict(ln.writes)) for ln in planned])
    have = _scratch_by_use([(r.kernel, reads, writes) for r, reads, writes in got])
    for ln, (r, _, _), (want_r, want_w), (reads, writes) in zip(planned, got, want, have):
        if r.kernel.startswith("cuda:"):
            assert want_r == reads, (cid, ln.kernel, "reads")
            assert want_w == writes, (cid, ln.kernel, "writes")
        else:  # an ATen kernel in the adapter
            assert set(want_r) == set(reads) and set(want_w) == set(writes), (cid, ln.kernel)
            assert (ln.bytes_read, ln.bytes_written) == r.aten_bytes, (cid, ln.kernel)


def test_every_cuda_op_has_a_plan_and_a_case():
    planned = set(planned_ops("cuda"))
    cased = {f"sapiens2::{name}" for _, name, _ in CUDA_CASES}
    every = {f"sapiens2::{op}" for op in CUDA_OPS}
    assert every <= planned, every - planned
    assert every <= cased, every - cased
