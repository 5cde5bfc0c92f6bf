"""Launch plans of the kernels PyTorch runs for the official Sapiens2 code on an H100 (bf16), for the
cost model's official side (``official_block.py``'s one-op stand-ins). Each pass cites the PyTorch
source it models; the ATen glue around them (views, pads, slices, cats, the output permute copy) is
not planned here: it is dispatched on the meta device and counted op by op like ours.

``nn.RMSNorm`` (``aten/src/ATen/native/cuda/layer_norm_kernel.cu``, ``_fused_rms_norm_cuda`` and
``_fused_rms_norm_backward_cuda``):
  forward: ``X.expect_contiguous()`` (a copy when the input is a permuted view, as the q/k norms'
  inputs are), then one vectorized kernel writing Y and the fp32 rstd;
  backward: the same contiguity copies of X and dY, the dX kernel, and the separate gamma-gradient
  kernel (``GammaBetaBackwardCUDAKernel``) that re-reads dY, X and rstd.

SDPA flash (``aten/src/ATen/native/transformers/cuda/attention.cu`` /
``attention_backward.cu`` and the vendored FlashAttention-2 ``flash_api.cpp``,
``flash_fwd_launch_template.h``, ``flash_bwd_launch_template.h``), with native GQA
(``enable_gqa=True``: K/V with fewer heads, no copies):
  forward: one ``flash_fwd_kernel`` writing O and the fp32 log-sum-exp; head dims are rounded up to
  the kernel's template (64; 80 and 76 run the 96-wide kernel after SDPA pads 76 to 80);
  backward: ``grad_out.contiguous()`` and ``out.contiguous()`` on the (B, N, H, D) views
  (``_flash_attention_backward``: copies unless the memory is already in that order), then
  ``flash_bwd_dot_do_o_kernel`` (delta = rowsum(dO * O), also clearing the fp32 dQ accumulator of
  ``round128(N)`` rows x ``round32(D)`` columns), the main ``flash_bwd_dq_dk_dv_loop_seqk_parallel``
  kernel (5 GEMMs per tile pair, dQ by atomics into the accumulator), ``flash_bwd_convert_dq_kernel``,
  and with GQA dK/dV written for every query head into expanded buffers and summed over each group
  (two ``at::sum_out`` kernels, ``mha_bwd``).
FLOPs are counted at the kernels' tiles (rows padded to the tile, the head dim to the template).
"""

from __future__ import annotations

from ..ops.plan import Plan, nbytes, register_plan

TORCH = "torch"


def _cdiv(a, b):
    return -(-int(a) // int(b))


def _round(x, m):
    return _cdiv(x, m) * m


def _es(t):
    return t.element_size()


# FlashAttention-2's template head dims and tiles on sm90 (flash_{fwd,bwd}_launch_template.h, the
# non-dropout, non-causal branches for a GPU that is not sm8x): head dim -> (kBlockM, kBlockN)
_FWD_TILES = {32: (128, 128), 64: (128, 128), 96: (128, 64), 128: (128, 64), 160: (128, 64), 192: (128, 64),
              224: (128, 64), 256: (128, 64)}
_BWD_TILES = {32: (128, 128), 64: (128, 128), 96: (64, 128), 128: (64, 128), 160: (64, 64), 192: (64, 64),
              224: (64, 64), 256: (64, 64)}


def flash_head_dim(D: int) -> int:
    """The template FlashAttention-2 runs a head dim with (after SDPA pads it to a multiple of 8)."""
    Dp = _round(D, 8)
    return next(t for t in sorted(_FWD_TILES) if t >= Dp)


@register_plan("sapiens2_cost::fused_rms_norm", TORCH)
def _rms_norm(x, w, eps):
    p = Plan()
    src = "x"
    if not x.is_contiguous():
        src = p.alloc("scratch:x_contiguous", nbytes(x))
        p.add("aten.clone", [("x", nbytes(x))], [(src, nbytes(x))])
    M = x.numel() // x.shape[-1]
    p.add("torch:rms_norm_fwd_kernel", [(src, nbytes(x)), ("w", nbytes(w))], [("out0", nbytes(x)), ("out1", 4 * M)])
    return p


@register_plan("sapiens2_cost::fused_rms_norm_backward", TORCH)
def _rms_norm_bwd(dy, x, w, rstd):
    p = Plan()
    srcs = {}
    for name, t in (("x", x), ("dy", dy)):
        srcs[name] = name
        if not t.is_contiguous():
            srcs[name] = p.alloc(f"scratch:{name}_contiguous", nbytes(t))
            p.add("aten.clone", [(name, nbytes(t))], [(srcs[name], nbytes(t))])
    p.add("torch:rms_norm_bwd_input_kernel", [(srcs["dy"], nbytes(dy)), (srcs["x"], nbytes(x)), ("rstd", nbytes(rstd)),
                                              ("w", nbytes(w))], [("out0", nbytes(x))])
    p.add("torch:gamma_backward_kernel", [(srcs["dy"], nbytes(dy)), (srcs["x"], nbytes(x)), ("rstd", nbytes(rstd))],
          [("out1", nbytes(w))])
    return p


@register_plan("sapiens2_cost::flash_sdpa", TORCH)
def _flash_fwd(q, k, v, scale):
    B, H, N, D = q.shape
    S = k.shape[2]
    Dk = flash_head_dim(D)
    bm, bn = _FWD_TILES[Dk]
    p = Plan()
    flops = B * H * _cdiv(N, bm) * _cdiv(S, bn) * 4 * bm * bn * Dk
    p.add("flash:flash_fwd_kernel", [("q", nbytes(q)), ("k", nbytes(k)), ("v", nbytes(v))],
          [("out0", nbytes(q)), ("out1", B * H * N * 4)], flops, matmul=True)
    return p


def _bnhd_contiguous(t) -> bool:
    """Whether a (B, H, N, D) tensor's memory is in (B, N, H, D) order (its transpose(1, 2) is contiguous)."""
    return t.transpose(1, 2).is_contiguous()


@register_plan("sapiens2_cost::flash_sdpa_backward", TORCH)
def _flash_bwd(do, q, k, v, o, lse, scale):
    B, H, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Dk = flash_head_dim(D)
    Dr = _round(D, 32) if D <= 128 else _round(D, 64)  # head_size_rounded (mha_bwd)
    bm, bn = _BWD_TILES[Dk]
    es = _es(q)
    p = Plan()
    src = {}
    for name, t in (("do", do), ("o", o)):
        src[name] = name
        if not _bnhd_contiguous(t):
            src[name] = p.alloc(f"scratch:{name}_contiguous", nbytes(t))
            p.add("aten.clone", [(name, nbytes(t))], [(src[name], nbytes(t))])
    Nr = _round(N, 128)
    d_sum = p.alloc("scratch:softmax_d", B * H * Nr * 4)
    acc = p.alloc("scratch:dq_accum", B * Nr * H * Dr * 4)
    gqa = Hkv != H
    dk_x = p.alloc("scratch:dk_expanded", B * S * H * D * es) if gqa else "out1"
    dv_x = p.alloc("scratch:dv_expanded", B * S * H * D * es) if gqa else "out2"
    p.add("flash:flash_bwd_dot_do_o_kernel", [(src["do"], nbytes(do)), (src["o"], nbytes(o))],
          [(d_sum, B * H * N * 4), (acc, B * Nr * H * Dr * 4)])
    flops = B * H * _cdiv(S, bn) * _cdiv(N, bm) * 5 * 2 * bm * bn * Dk
    p.add("flash:flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel",
          [("q", nbytes(q)), ("k", nbytes(k)), ("v", nbytes(v)), (src["do"], nbytes(do)), ("lse", nbytes(lse)),
           (d_sum, B * H * N * 4), (acc, B * N * H * Dr * 4)],
          [(acc, B * N * H * Dr * 4), (dk_x, B * S * H * D * es), (dv_x, B * S * H * D * es)], flops, matmul=True)
    p.add("flash:flash_bwd_convert_dq_kernel", [(acc, B * N * H * Dr * 4)], [("out0", nbytes(q))])
    if gqa:
        p.add("aten.sum", [(dk_x, B * S * H * D * es)], [("out1", nbytes(k))])
        p.add("aten.sum", [(dv_x, B * S * H * D * es)], [("out2", nbytes(v))])
    return p


# ---------------------------------------------------------------------------------------------- the attention baselines


def flash_attn_plans(B: int, N: int, H: int, Hkv: int, D: int, es: int = 2) -> tuple[Plan, Plan]:
    """FlashAttention-2 as ``flash_attn_func`` runs it on its native ``(B, N, H, D)`` layout (no
    contiguity copies): it pads a head dim that is not a multiple of 8 with copies of q, k, v (and dO
    in backward) and slices the outputs (views); the kernels as in the SDPA-flash plans above."""
    import torch

    Dp = _round(D, 8)
    meta = dict(device="meta", dtype=torch.bfloat16 if es == 2 else torch.float32)
    # (B, H, N, D)-shaped views of (B, N, H, D) memory, as flash-attn holds them
    q = torch.empty(B, N, H, Dp, **meta).transpose(1, 2)
    k = torch.empty(B, N, Hkv, Dp, **meta).transpose(1, 2)
    v = torch.empty(B, N, Hkv, Dp, **meta).transpose(1, 2)
    o = torch.empty(B, N, H, Dp, **meta).transpose(1, 2)
    lse = torch.empty(B, H, N, device="meta")
    fwd, bwd = Plan(), Plan()
    if Dp != D:
        for name, t in (("q", q), ("k", k), ("v", v)):
            fwd.add("aten.constant_pad_nd", [(name, nbytes(t) * D // Dp)], [(f"{name}_padded", nbytes(t))])
        bwd.add("aten.constant_pad_nd", [("do", nbytes(o) * D // Dp)], [("do_padded", nbytes(o))])
    fwd.launches += _flash_fwd(q, k, v, D ** -0.5).launches
    bwd.launches += _flash_bwd(o, q, k, v, o, lse, D ** -0.5).launches
    return fwd, bwd


# FlexAttention's default tiles on an H100 (torch/_inductor/kernel/flex: _get_default_config_fwd/_bwd):
# the head dim is padded in registers to the next power of two (masked loads, no copies)
def _flex_tiles(Dr: int) -> tuple[tuple[int, int], tuple[int, int]]:
    fwd = (128, 128) if Dr == 64 else (128, 64)
    bwd = (64, 64) if Dr == 64 else (64, 128)
    return fwd, bwd


def flex_plans(B: int, N: int, H: int, Hkv: int, D: int, es: int = 2) -> tuple[Plan, Plan]:
    """FlexAttention (compiled, no mask): one forward template kernel; backward a fused rowsum(dO * O)
    kernel (delta) and one template kernel whose programs compute either dQ for a query block
    (recomputing S and dP: 3 GEMMs) or dK, dV for a key block over the G heads of its group (4 GEMMs):
    7 GEMMs in all, no atomics. Any strides: no copies. FLOPs at the padded head dim's tiles."""
    Dr = 1 << (D - 1).bit_length()
    (fm, fn), (bm, bn) = _flex_tiles(Dr)
    q, kv, o, lse = B * N * H * D * es, B * N * Hkv * D * es, B * N * H * D * es, B * H * N * 4
    fwd, bwd = Plan(), Plan()
    fwd.add("flex:flex_attention", [("q", q), ("k", kv), ("v", kv)], [("out0", o), ("out1", lse)],
            B * H * _cdiv(N, fm) * _cdiv(N, fn) * 4 * fm * fn * Dr, matmul=True)
    bwd.add("flex:delta_reduction", [("o", o), ("do", o)], [("delta", lse)])
    gemm = 2 * bm * bn * Dr * B * H * _cdiv(N, bm) * _cdiv(N, bn)
    bwd.add("flex:flex_attention_backward", [("q", q), ("k", kv), ("v", kv), ("do", o), ("lse", lse), ("delta", lse)],
            [("dq", q), ("dk", kv), ("dv", kv)], 7 * gemm, matmul=True)
    return fwd, bwd
