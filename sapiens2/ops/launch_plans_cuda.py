"""Launch plans of the ``sapiens2`` ops on the ``"cuda"`` backend: the hand-written kernels of
``csrc/kernels`` as the bindings of ``csrc/bindings`` launch them (see ``plan.py``).

Each plan mirrors its binding and adapter (``sapiens2/ops/cuda``): the same partial-sum buffers
(sized by ``s2b::row_programs``: a few programs per SM, 3 SMs under the CPU emulation), each
kernel's distinct bytes per tensor, the ATen casts the adapters make, and the Triton plan where the
adapter hands a shape to Triton (RMSNorm rows wider than the kernels take, windows too large for
shared memory). ``tests/kernels/test_launch_plans.py`` holds each plan to the launches the
emulator logs (``sapiens2.cuda_tools.emu_ext.launch_log``). FLOPs are declared, not recorded (the
emulator does not count them): the window kernels compute the exact ``S x S`` scores on the CUDA
cores, no tiles.
"""

from __future__ import annotations

import torch

from . import launch_plans as tp
from .plan import Plan, nbytes, plan_for, register_plan

CU = "cuda"
EMULATED_SMS = 3  # s2b::row_programs under SAPIENS2_EMU (csrc/bindings/common.h)


def _sms(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return EMULATED_SMS if t.device.type == "cpu" else 132  # meta: an H100 SXM


def _row_programs(rows: int, sms: int, per_sm: int = 4) -> int:
    return max(1, min(rows, sms * per_sm))


def _triton(op: str, *args) -> Plan:
    return plan_for(f"sapiens2::{op}", "triton")(*args)


def _column_sum(p: Plan, part, part_bytes: int, out: str, out_bytes: int) -> None:
    if out_bytes:
        p.add("cuda:column_sum_kernel", [(part, part_bytes)], [(out, out_bytes)])


# ---------------------------------------------------------------------------------------------- RMSNorm


def _fits(x) -> bool:
    from .cuda.rms_norm import _fits as fits

    return fits(x)


@register_plan("sapiens2::rms_norm", CU)
def _rms_norm(x, weight, eps):
    if not _fits(x):
        return _triton("rms_norm", x, weight, eps)
    M, C = tp._rows(x)
    p = Plan()
    if M and C:
        p.add("cuda:rms_norm_fwd_kernel", [("x", nbytes(x)), ("weight", nbytes(weight))],
              [("out0", nbytes(x)), ("out1", 4 * M)])
    return p


@register_plan("sapiens2::add_rms_norm", CU)
def _add_rms_norm(x, residual, x_scale, weight, eps):
    if not _fits(x):
        return _triton("add_rms_norm", x, residual, x_scale, weight, eps)
    M, C = tp._rows(x)
    p = Plan()
    if M and C:
        reads = [("x", nbytes(x)), ("residual", nbytes(residual))]
        reads += [("x_scale", nbytes(x_scale))] if x_scale is not None else []
        p.add("cuda:rms_norm_fwd_kernel", reads + [("weight", nbytes(weight))],
              [("out0", nbytes(x)), ("out1", nbytes(residual)), ("out2", 4 * M)])
    return p


def _norm_bwd(dy, dh, x, h, x_scale, weight, rstd, grads, dw_label):
    """The backward kernel writes each program's fp32 partial rows of dweight (and dx_scale); one
    column sum per gradient finishes them."""
    M, C = tp._rows(h)
    P = _row_programs(M, _sms(h))
    p = Plan()
    dw_part = p.alloc("scratch:dw_part", P * C * 4)
    ds_part = p.alloc("scratch:ds_part", P * C * 4) if x_scale is not None else None
    if M and C:
        reads = [("dy", nbytes(dy))] + ([("dh", nbytes(dh))] if dh is not None else [])
        reads += [("x", nbytes(x))] if x_scale is not None or h is x else []
        reads += [("h", nbytes(h))] if h is not x else []
        reads += [("x_scale", nbytes(x_scale))] if x_scale is not None else []
        reads += [("weight", nbytes(weight)), ("rstd", nbytes(rstd))]
        writes = grads + [(dw_part, P * C * 4)] + ([(ds_part, P * C * 4)] if ds_part else [])
        p.add("cuda:rms_norm_bwd_kernel", reads, writes)
    _column_sum(p, dw_part, P * C * 4, dw_label, C * weight.element_size())
    if ds_part:
        _column_sum(p, ds_part, P * C * 4, "out3", C * x_scale.element_size())
    return p


@register_plan("sapiens2::rms_norm_backward", CU)
def _rms_norm_backward(dy, x, weight, rstd):
    if not _fits(x):
        return _triton("rms_norm_backward", dy, x, weight, rstd)
    return _norm_bwd(dy, None, x, x, None, weight, rstd, [("out0", nbytes(x))], "out1")


@register_plan("sapiens2::add_rms_norm_backward", CU)
def _add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd):
    if not _fits(x):
        return _triton("add_rms_norm_backward", dy, dh, x, h, x_scale, weight, rstd)
    grads = [("out0", nbytes(h))] + ([("out1", nbytes(x))] if x_scale is not None else [])
    return _norm_bwd(dy, dh, x, h, x_scale, weight, rstd, grads, "out2")


# ---------------------------------------------------------------------------------------------- SwiGLU

_SWIGLU_MAX_THREADS = 256  # kMaxThreads, csrc/kernels/swiglu.cu


def _swiglu_column_tiles(x12) -> int:
    """s2_swiglu_column_tiles: column tiles of F over blocks of up to 256 threads, one vector each."""
    F = x12.shape[-1] // 2
    width = 4 if x12.dtype == torch.float32 else 8
    vectors = tp._cdiv(F, width if F % width == 0 else 1)
    threads = min(_SWIGLU_MAX_THREADS, tp._cdiv(vectors, 32) * 32)
    return max(1, tp._cdiv(vectors, threads)) if F else 0


@register_plan("sapiens2::swiglu", CU)
def _swiglu(x12):
    p = Plan()
    if x12.numel():
        p.add("cuda:swiglu_kernel", [("x12", nbytes(x12))], [("out0", nbytes(x12) // 2)])
    return p


@register_plan("sapiens2::swiglu_backward", CU)
def _swiglu_backward(dy, x12):
    p = Plan()
    if x12.numel():
        p.add("cuda:swiglu_kernel", [("dy", nbytes(dy)), ("x12", nbytes(x12))], [("out0", nbytes(x12))])
    return p


def _recompute(ds, x12, bias: bool, s_label, dx_label: str, db_label: str):
    M, F2 = tp._rows(x12)
    p = Plan()
    P = max(1, min(max(M, 1), tp._cdiv(4 * _sms(x12), _swiglu_column_tiles(x12) or 1)))
    part = p.alloc("scratch:db_part", P * F2 * 4) if bias else None
    if M and F2:
        writes = ([(s_label, nbytes(x12) // 2)] if s_label else []) + [(dx_label, nbytes(x12))]
        writes += [(part, P * F2 * 4)] if bias else []
        p.add("cuda:swiglu_kernel", [("ds", nbytes(ds)), ("x12", nbytes(x12))], writes)
    if bias:
        _column_sum(p, part, P * F2 * 4, db_label, F2 * x12.element_size())
    return p


@register_plan("sapiens2::swiglu_recompute_backward", CU)
def _swiglu_recompute_backward(ds, x12, bias_grad):
    return _recompute(ds, x12, bool(bias_grad), "out0", "out1", "out2")


@register_plan("sapiens2::swiglu_bias_backward", CU)
def _swiglu_bias_backward(ds, x12):
    return _recompute(ds, x12, True, None, "out0", "out1")


@register_plan("sapiens2::partial_sums", CU)
def _partial_sums(part, dtype):
    p = Plan()
    R, C = part.shape
    if part.dtype != torch.float32:  # the adapter sums other dtypes with ATen (the float64 reference path)
        return p
    from .cuda.partial_sums import goes_to_triton

    if goes_to_triton(part):
        return _triton("partial_sums", part, dtype)
    _column_sum(p, "part", nbytes(part), "out0", C * torch.empty((), dtype=dtype).element_size())
    return p


# ---------------------------------------------------------------------------------------------- QK-norm + RoPE


def _same_kernel_dtype(q_weight, k_weight) -> bool:
    return q_weight.dtype == k_weight.dtype and q_weight.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _qk_inputs(p: Plan, q, q_weight, k_weight, sin, cos, num_prefix_tokens):
    """The adapter's fp32 copies, in its order: tables not in fp32 (two casts), then norm weights of
    different or unsupported dtypes. Returns the (label, bytes) the kernel reads for them (the tables
    only when some token is rotated)."""
    reads = []

    def fp32(name, t, read=True):
        label = name
        if t.dtype != torch.float32:
            label = p.alloc(f"scratch:{name}32", t.numel() * 4)
            p.add("aten._to_copy", [(name, nbytes(t))], [(label, t.numel() * 4)])
        if read:
            reads.append((label, t.numel() * 4))

    if sin is not None:
        rotated = q.shape[1] > num_prefix_tokens
        fp32("sin", sin, rotated)
        fp32("cos", cos, rotated)
    if _same_kernel_dtype(q_weight, k_weight):
        reads += [("q_weight", nbytes(q_weight)), ("k_weight", nbytes(k_weight))]
    else:
        fp32("q_weight", q_weight)
        fp32("k_weight", k_weight)
    return reads


def _qk_grid(q, per_sm: int) -> int:
    """grid_for (csrc/bindings/qk_norm_rope.cpp): programs x sample splits, the partial rows."""
    B, N = q.shape[0], q.shape[1]
    target = per_sm * _sms(q)
    splits = min(max(tp._cdiv(target, max(N, 1)), 1), min(max(B, 1), 65535))
    programs = min(max(tp._cdiv(target, splits), 1), max(N, 1))
    return programs * splits


@register_plan("sapiens2::qk_norm_rope", CU)
def _qk_norm_rope(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps):
    p = Plan()
    reads = _qk_inputs(p, q, q_weight, k_weight, sin, cos, num_prefix_tokens)
    B, N, H, D = q.shape
    if B * N:
        p.add("cuda:qk_norm_rope_fwd_kernel", [("q", nbytes(q)), ("k", nbytes(k))] + reads,
              [("out0", nbytes(q)), ("out1", nbytes(k)), ("out2", B * N * H * 4), ("out3", B * N * k.shape[2] * 4)])
    return p


@register_plan("sapiens2::qk_norm_rope_backward", CU)
def _qk_norm_rope_backward(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens):
    p = Plan()
    reads = _qk_inputs(p, q, q_weight, k_weight, sin, cos, num_prefix_tokens)
    B, N, H, D = q.shape
    parts = _qk_grid(q, 4)
    dq_part, dk_part = p.alloc("scratch:dqw_part", parts * D * 4), p.alloc("scratch:dkw_part", parts * D * 4)
    p.add("cuda:qk_norm_rope_bwd_kernel",
          [("dq", nbytes(dq)), ("dk", nbytes(dk)), ("q", nbytes(q)), ("k", nbytes(k))] + reads
          + [("q_rstd", nbytes(q_rstd)), ("k_rstd", nbytes(k_rstd))],
          [("out0", nbytes(q)), ("out1", nbytes(k)), (dq_part, parts * D * 4), (dk_part, parts * D * 4)])
    # the kernel's weight dtype: the weights' own when they share one it takes, else fp32 (copies);
    # the column sums write it and the adapter casts a gradient back to its weight's dtype
    kd = q_weight.dtype if _same_kernel_dtype(q_weight, k_weight) else torch.float32
    casts = []
    for part, out, w in ((dq_part, "out2", q_weight), (dk_part, "out3", k_weight)):
        if w.dtype == kd:
            _column_sum(p, part, parts * D * 4, out, D * w.element_size())
        else:
            tmp = p.alloc(f"scratch:{out}_f32", D * 4)
            _column_sum(p, part, parts * D * 4, tmp, D * 4)
            casts.append((tmp, out, w))
    for tmp, out, w in casts:
        p.add("aten._to_copy", [(tmp, D * 4)], [(out, D * w.element_size())])
    return p


# ---------------------------------------------------------------------------------------------- window attention

_WINDOW_KERNELS = {
    "triton:window_attention._wa_fwd_kernel": ("cuda:window_attention_fwd_kernel", 2),
    "triton:window_attention._wa_bwd_kernel": ("cuda:window_attention_bwd_kernel", 5),
    "triton:window_attention._cls_fwd_kernel": ("cuda:cls_pool_fwd_kernel", 2),
    "triton:window_attention._cls_bwd_kernel": ("cuda:cls_pool_bwd_kernel", 5),
}


def _window(op: str, kind: int, window: int, has_prefix: bool, x, B: int, nW: int, NH: int, D: int, *args) -> Plan:
    """The Triton plan's launches (the same bytes: every input once, every output once) under the
    CUDA kernels' names, FLOPs at the exact rows (``S`` keys for each of ``S`` queries, or the one
    CLS query); the Triton plan itself where the adapter routes the shape to Triton."""
    from .cuda import window_attention as cw

    triton_plan = _triton(op, *args)
    if x.device.type == "cuda" and not cw.supported(kind, window, has_prefix, D, x.device):
        return triton_plan
    cls = kind in (cw.CLS_FWD, cw.CLS_BWD)
    S = window * window + (1 if has_prefix or cls else 0)
    queries = 1 if cls else S
    p = Plan(scratch=dict(triton_plan.scratch))
    for ln in triton_plan.launches:
        name, products = _WINDOW_KERNELS.get(ln.kernel, (ln.kernel, 0))
        flops = B * nW * NH * products * 2 * queries * S * D if products else ln.flops
        # the CUDA cls backward recomputes the softmax and delta from the scores: it reads neither the
        # saved lse nor O
        reads = tuple(r for r in ln.reads if r[0] not in ("lse", "o")) if kind == cw.CLS_BWD else ln.reads
        p.add(name, reads, ln.writes, flops, matmul=ln.matmul)
    return p


def _wa_geometry(q, grid_h, grid_w, window, layout):
    B, L = q.shape[0], q.shape[1]
    return B, tp._num_windows(L, grid_h, grid_w, window, layout), q.shape[-2], q.shape[-1]


@register_plan("sapiens2::window_attention", CU)
def _window_attention(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import FWD

    g = _wa_geometry(q, grid_h, grid_w, window, layout)
    return _window("window_attention", FWD, window, prefix_q is not None, q, *g, q, k, v, prefix_q, prefix_k,
                   prefix_v, token_mask, grid_h, grid_w, window, layout, scale)


@register_plan("sapiens2::window_attention_qkv", CU)
def _window_attention_qkv(qkv, prefix_qkv, token_mask, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import FWD

    g = _wa_geometry(qkv, grid_h, grid_w, window, layout)
    return _window("window_attention_qkv", FWD, window, prefix_qkv is not None, qkv, *g, qkv, prefix_qkv,
                   token_mask, grid_h, grid_w, window, layout, scale)


@register_plan("sapiens2::window_attention_backward", CU)
def _window_attention_backward(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse,
                               grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import BWD

    g = _wa_geometry(q, grid_h, grid_w, window, layout)
    return _window("window_attention_backward", BWD, window, prefix_q is not None, q, *g, do, dprefix_o, q, k, v,
                   prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse, grid_h, grid_w, window, layout, scale)


@register_plan("sapiens2::window_attention_qkv_backward", CU)
def _window_attention_qkv_backward(do, dprefix_o, qkv, prefix_qkv, token_mask, o, prefix_o, lse, grid_h, grid_w,
                                   window, layout, scale, bias_grad=False):
    from .cuda.window_attention import BWD

    g = _wa_geometry(qkv, grid_h, grid_w, window, layout)
    return _window("window_attention_qkv_backward", BWD, window, prefix_qkv is not None, qkv, *g, do, dprefix_o,
                   qkv, prefix_qkv, token_mask, o, prefix_o, lse, grid_h, grid_w, window, layout, scale, bias_grad)


@register_plan("sapiens2::cls_pool", CU)
def _cls_pool(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import CLS_FWD

    g = _wa_geometry(k, grid_h, grid_w, window, layout)
    return _window("cls_pool", CLS_FWD, window, True, k, *g, cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window,
                   layout, scale)


@register_plan("sapiens2::cls_pool_kv", CU)
def _cls_pool_kv(cls_qkv, kv, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import CLS_FWD

    g = _wa_geometry(kv, grid_h, grid_w, window, layout)
    return _window("cls_pool_kv", CLS_FWD, window, True, kv, *g, cls_qkv, kv, grid_h, grid_w, window, layout, scale)


@register_plan("sapiens2::cls_pool_backward", CU)
def _cls_pool_backward(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import CLS_BWD

    g = _wa_geometry(k, grid_h, grid_w, window, layout)
    return _window("cls_pool_backward", CLS_BWD, window, True, k, *g, do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h,
                   grid_w, window, layout, scale)


@register_plan("sapiens2::cls_pool_kv_backward", CU)
def _cls_pool_kv_backward(do, cls_qkv, kv, o, lse, grid_h, grid_w, window, layout, scale):
    from .cuda.window_attention import CLS_BWD

    g = _wa_geometry(kv, grid_h, grid_w, window, layout)
    return _window("cls_pool_kv_backward", CLS_BWD, window, True, kv, *g, do, cls_qkv, kv, o, lse, grid_h, grid_w,
                   window, layout, scale)
