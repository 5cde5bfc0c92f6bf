"""Launch plans of every ``sapiens2`` op on the Triton backend (see ``plan.py``).

Each plan mirrors its launcher in ``sapiens2.kernels`` kernel by kernel: the same block-size
heuristics (imported from the kernel modules), the same scratch buffers, and for every kernel the
distinct bytes it loads and stores per tensor, listed in the kernel's argument order, and the FLOPs
of its ``tl.dot`` tiles. ``tests/kernels/test_launch_plans.py`` holds each plan to the launches the
interpreter records. Valid lengths (``seq_lens``) are taken from the tensor when it has values (CPU,
CUDA) and as full otherwise (the meta device: the cost model).

The number of programs of the reduction kernels depends on the GPU (a few per SM): the plans take
``sms`` from the device like the launchers, and 132 (an H100 SXM) on the meta device.
"""

from __future__ import annotations

import importlib

import torch

from .plan import Plan, nbytes, register_plan

T = "triton"


def _k(module: str):
    return importlib.import_module(f"sapiens2.kernels.{module}")


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _sms(t: torch.Tensor) -> int:
    return _k("_common").sm_count(t.device)


def _es(t) -> int:
    return t.element_size()


def _rows(x: torch.Tensor) -> tuple[int, int]:
    C = x.shape[-1]
    return (x.numel() // C if C else 0), C


# ---------------------------------------------------------------------------------------------- RMSNorm


def _norm_fwd(x, residual, x_scale, weight, outs):
    M, C = _rows(x)
    wide = _k("rms_norm").fwd_config(C)[0]
    p = Plan()
    if M and C:
        reads = [("x", nbytes(x))]
        if residual is not None:
            reads += [("residual", nbytes(residual))]
        if x_scale is not None:
            reads += [("x_scale", nbytes(x_scale))]
        reads += [("weight", nbytes(weight))]
        p.add(f"triton:rms_norm.{'_fwd_wide_kernel' if wide else '_fwd_kernel'}", reads, outs(M, C))
    return p


@register_plan("sapiens2::rms_norm", T)
def _rms_norm(x, weight, eps):
    return _norm_fwd(x, None, None, weight, lambda M, C: [("out0", nbytes(x)), ("out1", 4 * M)])


@register_plan("sapiens2::add_rms_norm", T)
def _add_rms_norm(x, residual, x_scale, weight, eps):
    return _norm_fwd(x, residual, x_scale, weight,
                     lambda M, C: [("out0", nbytes(x)), ("out1", nbytes(residual)), ("out2", 4 * M)])


def _norm_bwd(dy, dh, x, h, x_scale, weight, rstd, grads, dw_label):
    """The backward kernel (one fp32 partial row per program and slab) and the column sum."""
    M, C = _rows(h)
    kr = _k("rms_norm")
    wide = kr.bwd_config(C)[0]
    P = _k("_common").reduction_programs(M, h.device) if M else 1
    slabs = 2 if x_scale is not None else 1
    p = Plan()
    part = p.alloc("scratch:part", slabs * P * C * 4)
    if M and C:
        reads = [("dy", nbytes(dy))] + ([("dh", nbytes(dh))] if dh is not None else [])
        if x_scale is not None:
            reads += [("x", nbytes(x))]
        reads += [("h" if h is not x else "x", nbytes(h))]
        if x_scale is not None:
            reads += [("x_scale", nbytes(x_scale))]
        reads += [("weight", nbytes(weight)), ("rstd", 4 * M)]
        if wide:  # its partial rows are zeroed by the kernel and then updated in place: read and written
            reads += [(part, slabs * P * C * 4)]
        p.add(f"triton:rms_norm.{'_bwd_wide_kernel' if wide else '_bwd_kernel'}", reads,
              grads + [(part, slabs * P * C * 4)])
    else:
        p.add("aten.zero_", (), [(part, slabs * P * C * 4)])
    if C:
        outs = [(dw_label, C * _es(weight))]
        if x_scale is not None:
            outs.append(("out3", C * _es(x_scale)))
        p.add("triton:column_sum._column_sum_kernel", [(part, slabs * P * C * 4)], outs)
    return p


@register_plan("sapiens2::rms_norm_backward", T)
def _rms_norm_backward(dy, x, weight, rstd):
    return _norm_bwd(dy, None, x, x, None, weight, rstd, [("out0", nbytes(x))], "out1")


@register_plan("sapiens2::add_rms_norm_backward", T)
def _add_rms_norm_backward(dy, dh, x, h, x_scale, weight, rstd):
    # outputs (dresidual, dx or empty, dweight, dx_scale or empty): the kernel writes DX then DRES
    grads = [("out1", nbytes(x)), ("out0", nbytes(h))] if x_scale is not None else [("out0", nbytes(h))]
    return _norm_bwd(dy, dh, x, h, x_scale, weight, rstd, grads, "out2")


# ---------------------------------------------------------------------------------------------- SwiGLU


@register_plan("sapiens2::swiglu", T)
def _swiglu(x12):
    p = Plan()
    if x12.numel():
        p.add("triton:swiglu._fwd_kernel", [("x12", nbytes(x12))], [("out0", nbytes(x12) // 2)])
    return p


@register_plan("sapiens2::swiglu_backward", T)
def _swiglu_backward(dy, x12):
    p = Plan()
    if x12.numel():
        p.add("triton:swiglu._bwd_kernel", [("dy", nbytes(dy)), ("x12", nbytes(x12))], [("out0", nbytes(x12))])
    return p


def _recompute(ds, x12, bias: bool, write_s: bool, dx_label: str, db_label: str):
    ks = _k("swiglu")
    M, F2 = _rows(x12)
    F = F2 // 2
    cols = _cdiv(F, ks.BLOCK_F) if F else 1
    P = max(1, min(M, _cdiv(4 * _sms(x12), cols))) if bias else M
    p = Plan()
    part = p.alloc("scratch:part", (P if bias else 1) * F2 * 4)
    if M and F:
        writes = ([("out0", M * F * _es(x12))] if write_s else []) + [(dx_label, nbytes(x12))]
        if bias:
            writes.append((part, P * F2 * 4))
        p.add("triton:swiglu._recompute_bwd_kernel", [("ds", nbytes(ds)), ("x12", nbytes(x12))], writes)
    elif bias:
        p.add("aten.zero_", (), [(part, P * F2 * 4)])
    if bias and F2:
        p.add("triton:column_sum._column_sum_kernel", [(part, P * F2 * 4)], [(db_label, F2 * _es(x12))])
    return p


@register_plan("sapiens2::swiglu_recompute_backward", T)
def _swiglu_recompute_backward(ds, x12, bias_grad):
    return _recompute(ds, x12, bool(bias_grad), True, "out1", "out2")


@register_plan("sapiens2::swiglu_bias_backward", T)
def _swiglu_bias_backward(ds, x12):
    return _recompute(ds, x12, True, False, "out0", "out1")


@register_plan("sapiens2::partial_sums", T)
def _partial_sums(part, dtype):
    p = Plan()
    R, C = part.shape
    if C:
        p.add("triton:column_sum._column_sum_kernel", [("part", nbytes(part))],
              [("out0", C * torch.empty((), dtype=dtype).element_size())])
    return p


# ---------------------------------------------------------------------------------------------- QK-norm + RoPE


def _qk_tables(p: Plan, q, sin, cos):
    """The launcher's fp32 copies of bf16/fp16 tables (two cast kernels), or the fp32 tables as they are;
    without RoPE, one zero-filled (1, D) dummy table."""
    if sin is None:
        dummy = p.alloc("scratch:dummy_table", q.shape[-1] * 4)
        p.add("aten.zeros", (), [(dummy, q.shape[-1] * 4)])
        return [(dummy, q.shape[-1] * 4), (dummy, 0)]
    if sin.dtype == torch.float32:
        return [("sin", nbytes(sin)), ("cos", nbytes(cos))]
    f32 = sin.numel() * 4
    s, c = p.alloc("scratch:sin32", f32), p.alloc("scratch:cos32", f32)
    p.add("aten._to_copy", [("sin", nbytes(sin))], [(s, f32)])
    p.add("aten._to_copy", [("cos", nbytes(cos))], [(c, f32)])
    return [(s, f32), (c, f32)]


@register_plan("sapiens2::qk_norm_rope", T)
def _qk_norm_rope(q, k, q_weight, k_weight, sin, cos, num_prefix_tokens, eps):
    p = Plan()
    tabs = _qk_tables(p, q, sin, cos)
    B, N, H, D = q.shape
    Hk = k.shape[2]
    if B * N:
        p.add("triton:qk_norm_rope._fwd_kernel",
              [("q", nbytes(q)), ("k", nbytes(k)), ("q_weight", nbytes(q_weight)), ("k_weight", nbytes(k_weight))]
              + _table_reads(tabs, B, N, D, num_prefix_tokens, sin),
              [("out0", nbytes(q)), ("out1", nbytes(k)), ("out2", B * N * H * 4), ("out3", B * N * Hk * 4)])
    return p


def _table_reads(tabs, B, N, D, P, sin):
    """Distinct table bytes the rotated tokens read: every row of the (N - P, D) or per-sample table."""
    if sin is None or N <= P:
        return []
    return tabs


@register_plan("sapiens2::qk_norm_rope_backward", T)
def _qk_norm_rope_backward(dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, num_prefix_tokens):
    p = Plan()
    tabs = _qk_tables(p, q, sin, cos)
    B, N, H, D = q.shape
    T_ = B * N
    programs = max(1, min(T_, 4 * _sms(q)))
    part = p.alloc("scratch:part", 2 * programs * D * 4)
    if T_:
        p.add("triton:qk_norm_rope._bwd_kernel",
              [("dq", nbytes(dq)), ("dk", nbytes(dk)), ("q", nbytes(q)), ("k", nbytes(k)),
               ("q_rstd", nbytes(q_rstd)), ("k_rstd", nbytes(k_rstd)), ("q_weight", nbytes(q_weight)),
               ("k_weight", nbytes(k_weight))] + _table_reads(tabs, B, N, D, num_prefix_tokens, sin),
              [("out0", nbytes(q)), ("out1", nbytes(k)), (part, 2 * programs * D * 4)])
    else:
        p.add("aten.zero_", (), [(part, 2 * programs * D * 4)])
    p.add("triton:column_sum._column_sum_kernel", [(part, 2 * programs * D * 4)],
          [("out2", D * _es(q_weight)), ("out3", D * _es(k_weight))])
    return p


# ---------------------------------------------------------------------------------------------- attention


def _lengths(seq_lens, B: int, N: int) -> list[int]:
    if seq_lens is None or seq_lens.device.type == "meta":
        return [N] * B
    return [int(x) for x in seq_lens.tolist()]


def _tile_d(D: int) -> int:
    D0, D1, has_d1 = _k("attention_prologue").split_head_dim(D)
    return D0 + (D1 if has_d1 else 0)


def _sincos(sin, cos, B):
    """Distinct bytes of the RoPE tables the rotated tokens read (all rows)."""
    return [("sin", nbytes(sin)), ("cos", nbytes(cos))] if sin is not None else []


def _visited_rows(lengths, block: int, N: int) -> list[int]:
    """Rows of each sample the attention loops visit: whole blocks up to its length, within N."""
    return [min(N, _cdiv(L_, block) * block) if L_ else 0 for L_ in lengths]


@register_plan("sapiens2::attention", T)
def _attention(q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps,
               deterministic=False):
    ka = _k("attention")
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    es = _es(q)
    lengths = _lengths(seq_lens, B, N)
    prologue = q_norm_weight is not None or sin is not None
    cfg = ka.fwd_config(D, q.dtype)
    p = Plan()
    kp = "k"
    if prologue:
        kp = p.alloc("scratch:k_prologue", nbytes(k))
        if k.numel():
            p.add("triton:attention._norm_rope_kernel",
                  [("k", nbytes(k))] + ([("k_norm_weight", nbytes(k_norm_weight))] if q_norm_weight is not None else [])
                  + _sincos(sin, cos, B), [(kp, nbytes(k))])
    if B * H and N:
        kv_rows = sum(lengths) * Hkv * D * es
        reads = ([("seq_lens", nbytes(seq_lens))] if seq_lens is not None else []) + [
            ("q", nbytes(q)), (kp, kv_rows), ("v", kv_rows)]
        if q_norm_weight is not None:
            reads.append(("q_norm_weight", nbytes(q_norm_weight)))
        reads += _sincos(sin, cos, B)
        n_q = _cdiv(N, cfg["BLOCK_M"])
        flops = sum(_cdiv(L_, cfg["BLOCK_N"]) for L_ in lengths) * H * n_q * 4 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * _tile_d(D)
        p.add("triton:attention._attn_fwd_kernel", reads, [("out0", nbytes(q)), ("out1", B * H * N * 4)], flops,
              matmul=True)
    return p


@register_plan("sapiens2::attention_backward", T)
def _attention_backward(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens,
                        scale, norm_eps, deterministic=False, bias_grad=False):
    kb = _k("attention_bwd")
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    es = _es(q)
    has_norm, has_rope = q_norm_weight is not None, sin is not None
    prologue = has_norm or has_rope
    lengths = _lengths(seq_lens, B, N)
    cfg = kb.bwd_config(D, q.dtype, has_norm, has_rope)
    kvc, dqc = cfg["kv"], cfg["dq"]
    Dt = _tile_d(D)
    n_kb = _cdiv(N, kvc["BLOCK_N"])
    n_qb = _cdiv(N, dqc["BLOCK_M"]) if deterministic else n_kb
    n_kparts, n_qparts = n_kb * B * Hkv, n_qb * B * H
    RQ = B * N * H
    lens_read = [("seq_lens", nbytes(seq_lens))] if seq_lens is not None else []
    p = Plan()
    delta = p.alloc("scratch:delta", B * H * N * 4)
    acc = None if deterministic else p.alloc("scratch:dq_acc", RQ * D * 4)
    counter = p.alloc("scratch:counter", 4)
    qp = p.alloc("scratch:q_prologue", nbytes(q)) if prologue else "q"
    kp = p.alloc("scratch:k_prologue", nbytes(k)) if prologue else "k"
    parts = p.alloc("scratch:norm_weight_parts", (n_kparts + n_qparts) * D * 4) if has_norm else None
    bq = p.alloc("scratch:bias_parts_q", B * n_qb * H * D * 4) if bias_grad else None
    bkv = p.alloc("scratch:bias_parts_kv", B * n_kb * 2 * Hkv * D * 4) if bias_grad else None
    wq = [("q_norm_weight", nbytes(q_norm_weight))] if has_norm else []
    wk = [("k_norm_weight", nbytes(k_norm_weight))] if has_norm else []
    tables = _sincos(sin, cos, B)

    # 1. preprocess
    reads = [("o", nbytes(o)), ("do", nbytes(do))]
    if prologue:
        reads += [("q", nbytes(q))] + wq + [("k", nbytes(k))] + wk
    reads += lens_read + (tables if prologue else [])
    writes = [(delta, B * H * N * 4)] + ([(acc, RQ * D * 4)] if acc else [])
    if prologue:
        writes += [(qp, nbytes(q)), (kp, nbytes(k))]
    writes += [(counter, 4)]
    p.add("triton:attention_bwd._bwd_prep_kernel", reads, writes)

    # 2. dK, dV (+ dQ atomics)
    q_rows = _visited_rows(lengths, kvc["BLOCK_M"], N)  # query rows each sample's loops visit
    qr = sum(q_rows)
    reads = lens_read + [(qp, qr * H * D * es), (kp, sum(lengths) * Hkv * D * es), ("v", sum(lengths) * Hkv * D * es),
                         ("do", qr * H * D * es), ("lse", qr * H * 4), (delta, qr * H * 4)]
    if acc:
        reads.append((acc, qr * H * D * 4))
    if prologue:
        reads += [("k", nbytes(k))] + wk + tables
    writes = [("out1", nbytes(k)), ("out2", nbytes(v))] + ([(acc, qr * H * D * 4)] if acc else [])
    if has_norm:
        writes.append((parts, n_kparts * D * 4))
    if bias_grad:
        writes.append((bkv, B * n_kb * 2 * Hkv * D * 4))
    pairs = sum(_cdiv(L_, kvc["BLOCK_N"]) * _cdiv(L_, kvc["BLOCK_M"]) for L_ in lengths) * H
    p.add("triton:attention_bwd._bwd_kv_kernel", reads, writes,
          pairs * (4 if deterministic else 5) * 2 * kvc["BLOCK_M"] * kvc["BLOCK_N"] * Dt, matmul=True)

    # 3. dQ
    finish = []  # the last program's reads and writes of the norm-weight partials
    if has_norm:
        finish = [(parts, (n_kparts + n_qparts) * D * 4), (counter, 4)]
    # the dQ kernel (deterministic) or the finalize: dq, the last program's norm-weight gradients, bias partials
    writes = [("out0", nbytes(q))]
    if has_norm:
        writes += [(parts, n_qparts * D * 4), (counter, 4), ("out4", nbytes(k_norm_weight)),
                   ("out3", nbytes(q_norm_weight))]
    if bias_grad:
        writes.append((bq, B * n_qb * H * D * 4))
    if deterministic:
        reads = lens_read + [(qp, nbytes(q)), (kp, sum(lengths) * Hkv * D * es), ("v", sum(lengths) * Hkv * D * es),
                             ("do", nbytes(do))]
        if prologue:
            reads += [("q", nbytes(q))] + wq
        reads += [("lse", B * H * N * 4), (delta, B * H * N * 4)] + (tables if prologue else []) + finish
        pairs = sum(_cdiv(L_, dqc["BLOCK_N"]) * _cdiv(L_, dqc["BLOCK_M"]) for L_ in lengths) * H
        p.add("triton:attention_bwd._bwd_dq_kernel", reads, writes,
              pairs * 3 * 2 * dqc["BLOCK_M"] * dqc["BLOCK_N"] * Dt, matmul=True)
    else:
        reads = [(acc, RQ * D * 4)] + ([("q", nbytes(q))] + wq + tables if prologue else []) + finish
        p.add("triton:attention_bwd._bwd_dq_finalize_kernel", reads, writes)
    if bias_grad:
        p.add("triton:column_sum._column_sum_kernel", [(bq, B * n_qb * H * D * 4)], [("out5", H * D * es)])
        p.add("triton:column_sum._column_sum_kernel", [(bkv, B * n_kb * 2 * Hkv * D * 4)], [("out5", 2 * Hkv * D * es)])
    return p


def _order_kv_writes(writes, acc, parts):
    """The kv kernel's stores in its argument order (DK, DV, DQ_ACC, ..., DW_PART)."""
    order = {"out1": 0, "out2": 1, acc: 2, parts: 3}
    return sorted(writes, key=lambda w: order.get(w[0], 9))


# ---------------------------------------------------------------------------------------------- window attention


def _num_windows(L, gh, gw, w, layout):
    return (gh // w) * (gw // w) if layout == "grid" else L // (w * w)


def _window_flops(B, nW, NH, window, D, kind: str) -> int:
    """FLOPs at the kernel's tiles (tiny windows, w = 2, compute the same padded tiles with broadcast
    products on the CUDA cores instead of tl.dot)."""
    cfg = _k("window_attention")._config(kind, window, D)
    dots = 2 if kind == "fwd" else 5
    return B * nW * NH * dots * 2 * cfg["BLOCK_N"] * cfg["BLOCK_N"] * cfg["BLOCK_D"]


def _wa_fwd_plan(reads, B, L, NH, D, nW, S, has_prefix, window, es):
    p = Plan()
    if B * nW * NH:
        writes = [("out0", B * L * NH * D * es)] + ([("out1", B * nW * NH * D * es)] if has_prefix else [])
        writes += [("out2", B * nW * NH * S * 4)]
        p.add("triton:window_attention._wa_fwd_kernel", reads, writes, _window_flops(B, nW, NH, window, D, "fwd"),
              matmul=True)
    return p


@register_plan("sapiens2::window_attention", T)
def _window_attention(q, k, v, prefix_q, prefix_k, prefix_v, token_mask, grid_h, grid_w, window, layout, scale):
    B, L, NH, D = q.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    hp = prefix_q is not None
    reads = [("q", nbytes(q)), ("k", nbytes(k)), ("v", nbytes(v))]
    if hp:
        reads += [("prefix_q", nbytes(prefix_q)), ("prefix_k", nbytes(prefix_k)), ("prefix_v", nbytes(prefix_v))]
    if token_mask is not None:
        reads.append(("token_mask", nbytes(token_mask)))
    return _wa_fwd_plan(reads, B, L, NH, D, nW, window * window + hp, hp, window, _es(q))


@register_plan("sapiens2::window_attention_qkv", T)
def _window_attention_qkv(qkv, prefix_qkv, token_mask, grid_h, grid_w, window, layout, scale):
    B, L, _, NH, D = qkv.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    hp = prefix_qkv is not None
    reads = [("qkv", nbytes(qkv))] + ([("prefix_qkv", nbytes(prefix_qkv))] if hp else [])
    if token_mask is not None:
        reads.append(("token_mask", nbytes(token_mask)))
    return _wa_fwd_plan(reads, B, L, NH, D, nW, window * window + hp, hp, window, _es(qkv))


def _wa_bwd_plan(reads, writes, B, nW, NH, window, D):
    p = Plan()
    if B * nW * NH:
        p.add("triton:window_attention._wa_bwd_kernel", reads, writes, _window_flops(B, nW, NH, window, D, "bwd"),
              matmul=True)
    return p


@register_plan("sapiens2::window_attention_backward", T)
def _window_attention_backward(do, dprefix_o, q, k, v, prefix_q, prefix_k, prefix_v, token_mask, o, prefix_o, lse,
                               grid_h, grid_w, window, layout, scale):
    B, L, NH, D = q.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    hp = prefix_q is not None
    reads = [("do", nbytes(do))] + ([("dprefix_o", nbytes(dprefix_o))] if hp and dprefix_o is not None else [])
    reads += [("q", nbytes(q)), ("k", nbytes(k)), ("v", nbytes(v))]
    if hp:
        reads += [("prefix_q", nbytes(prefix_q)), ("prefix_k", nbytes(prefix_k)), ("prefix_v", nbytes(prefix_v))]
    if token_mask is not None:
        reads.append(("token_mask", nbytes(token_mask)))
    reads += [("o", nbytes(o))] + ([("prefix_o", nbytes(prefix_o))] if hp else []) + [("lse", nbytes(lse))]
    writes = [("out0", nbytes(q)), ("out1", nbytes(k)), ("out2", nbytes(v))]
    if hp:
        writes += [("out3", nbytes(prefix_q)), ("out4", nbytes(prefix_k)), ("out5", nbytes(prefix_v))]
    return _wa_bwd_plan(reads, writes, B, nW, NH, window, D)


@register_plan("sapiens2::window_attention_qkv_backward", T)
def _window_attention_qkv_backward(do, dprefix_o, qkv, prefix_qkv, token_mask, o, prefix_o, lse, grid_h, grid_w,
                                   window, layout, scale, bias_grad=False):
    B, L, _, NH, D = qkv.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    hp = prefix_qkv is not None
    reads = [("do", nbytes(do))] + ([("dprefix_o", nbytes(dprefix_o))] if hp and dprefix_o is not None else [])
    reads += [("qkv", nbytes(qkv))] + ([("prefix_qkv", nbytes(prefix_qkv))] if hp else [])
    if token_mask is not None:
        reads.append(("token_mask", nbytes(token_mask)))
    reads += [("o", nbytes(o))] + ([("prefix_o", nbytes(prefix_o))] if hp else []) + [("lse", nbytes(lse))]
    writes = [("out0", nbytes(qkv))] + ([("out1", nbytes(prefix_qkv))] if hp else [])
    if bias_grad:
        writes.append(("out2", B * nW * 3 * NH * D * 4))
    return _wa_bwd_plan(reads, writes, B, nW, NH, window, D)


@register_plan("sapiens2::cls_pool", T)
def _cls_pool(cls_q, cls_k, cls_v, k, v, grid_h, grid_w, window, layout, scale):
    B, L, NH, D = k.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    p = Plan()
    if B * nW * NH:
        p.add("triton:window_attention._cls_fwd_kernel",
              [("cls_q", nbytes(cls_q)), ("cls_k", nbytes(cls_k)), ("cls_v", nbytes(cls_v)), ("k", nbytes(k)),
               ("v", nbytes(v))], [("out0", nbytes(cls_q)), ("out1", B * nW * NH * 4)])
    return p


@register_plan("sapiens2::cls_pool_kv", T)
def _cls_pool_kv(cls_qkv, kv, grid_h, grid_w, window, layout, scale):
    B, L, _, NH, D = kv.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    p = Plan()
    if B * nW * NH:
        p.add("triton:window_attention._cls_fwd_kernel", [("cls_qkv", nbytes(cls_qkv)), ("kv", nbytes(kv))],
              [("out0", nbytes(cls_qkv) // 3), ("out1", B * nW * NH * 4)])
    return p


@register_plan("sapiens2::cls_pool_backward", T)
def _cls_pool_backward(do, cls_q, cls_k, cls_v, k, v, o, lse, grid_h, grid_w, window, layout, scale):
    B, L, NH, D = k.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    p = Plan()
    if B * nW * NH:
        p.add("triton:window_attention._cls_bwd_kernel",
              [("do", nbytes(do)), ("cls_q", nbytes(cls_q)), ("cls_k", nbytes(cls_k)), ("cls_v", nbytes(cls_v)),
               ("k", nbytes(k)), ("v", nbytes(v)), ("o", nbytes(o)), ("lse", nbytes(lse))],
              [("out0", nbytes(cls_q)), ("out1", nbytes(cls_k)), ("out2", nbytes(cls_v)), ("out3", nbytes(k)),
               ("out4", nbytes(v))])
    return p


@register_plan("sapiens2::cls_pool_kv_backward", T)
def _cls_pool_kv_backward(do, cls_qkv, kv, o, lse, grid_h, grid_w, window, layout, scale):
    B, L, _, NH, D = kv.shape
    nW = _num_windows(L, grid_h, grid_w, window, layout)
    p = Plan()
    if B * nW * NH:
        p.add("triton:window_attention._cls_bwd_kernel",
              [("do", nbytes(do)), ("cls_qkv", nbytes(cls_qkv)), ("kv", nbytes(kv)), ("o", nbytes(o)),
               ("lse", nbytes(lse))], [("out0", nbytes(cls_qkv)), ("out1", nbytes(kv))])
    return p


# ---------------------------------------------------------------------------------------------- packed attention


def _relabel(plan: Plan, names: dict) -> Plan:
    """The same launches with tensors renamed (several to one: their bytes add, being disjoint slots)."""
    out = Plan(scratch=dict(plan.scratch))
    for ln in plan.launches:
        merged = []
        for group in (ln.reads, ln.writes):
            acc: dict = {}
            for k, b in group:
                k = names.get(k, k)
                acc[k] = acc.get(k, 0) + b
            merged.append(list(acc.items()))
        out.add(ln.kernel, merged[0], merged[1], ln.flops, ln.matmul)
    return out


@register_plan("sapiens2::attention_qkv", T)
def _attention_qkv(qkv, num_heads, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
                   norm_eps, deterministic=False):
    from .attention_packed import split_qkv

    q, k, v = split_qkv(qkv, num_heads)
    return _relabel(_attention(q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale,
                               norm_eps, deterministic), {"q": "qkv", "k": "qkv", "v": "qkv"})


@register_plan("sapiens2::attention_qkv_backward", T)
def _attention_qkv_backward(do, qkv, o, lse, num_heads, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens,
                            seq_lens, scale, norm_eps, deterministic=False, bias_grad=False):
    from .attention_packed import split_qkv

    q, k, v = split_qkv(qkv, num_heads)
    plan = _attention_backward(do, q, k, v, o, lse, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens,
                               seq_lens, scale, norm_eps, deterministic, bias_grad)
    return _relabel(plan, {"q": "qkv", "k": "qkv", "v": "qkv", "out0": "out0", "out1": "out0", "out2": "out0",
                           "out3": "out1", "out4": "out2", "out5": "out3"})
