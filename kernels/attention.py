"""Flash attention forward with GQA, fused QK-RMSNorm + rotate-half RoPE prologue and per-sample
valid lengths, on the projections' ``(B, N, heads, D)`` layout; the backward is in ``attention_bwd``.

Contract: ``sapiens2/ops/attention.py`` (``_attention_ref`` / ``_attention_bwd_ref`` define it).

Layout and head dims
    q, o ``(B, N, H, D)``; k, v ``(B, N, Hkv, D)``, heads and head dim contiguous with the TRUE head
    dim in memory (no padding); the token stride may be larger (q, k, v as slots of one packed
    projection, read in place). A 76-wide bf16 head row is 152 bytes, so D = 76 tiles load in
    8-byte vectors where 64 and 80 use 16-byte ones (``compile_gate`` reports the share). Query head ``h`` reads KV head ``h // (H // Hkv)`` through its pointer; K and V
    are never expanded or copied. The head dim is covered by a power-of-two tile ``D0`` plus, when
    ``D`` is not a power of two, a masked 16-wide tile ``D1`` (``attention_prologue.split_head_dim``:
    76 and 80 -> 64 + 16), so every matmul is a legal wgmma K and D = 80 does 80/128 of the
    tensor-core work of a 128-wide tile. Head dims below 16 are rejected.

Forward (``attention_fwd``), 1 launch, or 2 with a norm and/or RoPE:
    * k pre-pass (only with norm and/or RoPE): ``_norm_rope_kernel`` writes the normalised and
      rotated k once to a scratch tensor in k's dtype (not saved, recomputed in backward). Doing it
      inside the attention loop would redo the norm + RoPE of every K tile once per query block
      (N / BLOCK_M times, plus the partner-column loads of rotate-half) on the CUDA cores of the
      hot loop; the pre-pass costs one extra read + write of k (~2 * B*N*Hkv*D elements).
    * ``_attn_fwd_kernel``: one program per (query block, b * H + h). q's norm + RoPE are fused into
      its prologue (done once per q tile). Online softmax in the exp2 domain, fp32 accumulation;
      the full key blocks run without masks, the ragged tail block (keys >= seq_len) masks.
      Keys are only visited up to ``seq_lens[b]``. Saves ``o`` and ``lse`` (natural log, fp32).
    Norm weights, RoPE tables (fp32 or the activations' dtype) and ``seq_lens`` (int32 or int64) are
    read as they are: no conversion kernels.

Numerics: fp32 accumulation and fp32 softmax always; fp32 inputs use IEEE fp32 dots
(``input_precision="ieee"``, not TF32); fp16/bf16 feed the tensor cores in their own dtype.
Norm and RoPE in fp32.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): bf16 arithmetic is not emulated there, so every
loaded fp16/bf16 tile is upcast to fp32 right after loading, operands that the GPU path rounds to
the input dtype are rounded in fp32 registers (round-to-nearest-even emulated on the bits for
bf16, whose interpreted conversion truncates), and stores are pre-rounded the same way.

Block sizes (``fwd_config``, per head dim and dtype, Hopper-oriented, no autotune), fp16/bf16:
D=64: BLOCK_M=128, BLOCK_N=128; D=76/80/128: 128 x 64; 8 warps, 3 stages; the k pre-pass 32 rows,
4 warps. fp32 (IEEE dots, no tensor cores): 64 x 32 tiles, 4 warps.

``SHIPPED_CONFIGS``: every (kernel, dtype, head dim, constexpr flags, config) the forward and
backward launchers can pick for bf16/fp16 at real shapes, as ``{"name", "fn", "signature",
"constexprs", "attrs", "num_warps", "num_stages"}``. ``attrs`` (``ASTSource`` form) marks the
pointer arguments 16-byte aligned, as the runtime JIT specialises them for torch allocations;
compiling without it gives scalar, unvectorised loads (and spills) that never run. Norm weights and
RoPE tables appear in two pointer types: the activations' dtype (the model's bf16 parameters and
default bf16 tables) and fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import signature
from ._common import INTERPRET as _INTERPRET
from ._common import as_operand
from .attention_prologue import (LOG2E, head_rows_prologue, ld, prologue_cols, rstd_rows, seq_len, split_head_dim,
                                 tables)

_LN2 = tl.constexpr(0.6931471805599453)
_split_head_dim = split_head_dim  # the name the tests and the cost model know


# ----------------------------------------------------------------------------------------------
# k pre-pass


@triton.jit
def _norm_rope_kernel(X, Y, W, SIN, COS, R, N, HEADS, P, SIN_BSTRIDE, SX, eps,
                      D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Rows r = (b*N + n)*HEADS + head of x (token stride SX): y = rope(norm(x) * w), contiguous, Y's dtype."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head_rows_prologue(X, Y, r, r < R, HEADS, N, SX, W, SIN, COS, SIN_BSTRIDE, P, eps,
                       D, D0, D1, HAS_D1, HAS_NORM, HAS_ROPE, INTERPRET)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, k_stride, v_base, v_stride, L, lo, hi, qk_scale,
               D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        row = k_base + offs_n.to(tl.int64) * k_stride
        vrow = v_base + offs_n.to(tl.int64) * v_stride
        k0 = ld(K + row[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if HAS_D1:
            m1 = nmask[:, None] & (c1[None, :] < D)
            k1 = ld(K + row[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
        s = s * qk_scale
        if MASK:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pp = as_operand(p, DTYPE, INTERPRET)
        v0 = ld(V + vrow[:, None] + c0[None, :], nmask[:, None], 0.0, INTERPRET)
        acc0 = tl.dot(pp, v0, acc0 * alpha[:, None], input_precision=PREC)
        if HAS_D1:
            v1 = ld(V + vrow[:, None] + c1[None, :], m1, 0.0, INTERPRET)
            acc1 = tl.dot(pp, v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, QW, SIN, COS, SEQ_LENS,
                     N, H, G, P, SIN_BSTRIDE, SQ, SK, SV, eps, qk_scale,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                     HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_LENS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                     INTERPRET: tl.constexpr):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    L = seq_len(SEQ_LENS, b, N, HAS_LENS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < N
    q_row = (b * N + offs_m).to(tl.int64) * SQ + h * D  # q may be a strided slot of a packed qkv
    o_row = ((b * N + offs_m).to(tl.int64) * H + h) * D
    srow = b.to(tl.int64) * SIN_BSTRIDE + (offs_m - P).to(tl.int64) * D
    # prologue: q norm + RoPE, once per q tile
    if HAS_NORM:
        rstd = rstd_rows(Q, q_row, rmask, eps, D, D0, D1, HAS_D1, INTERPRET)
    else:
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    q0 = as_operand(prologue_cols(Q, q_row, offs_m, rmask, rstd, QW, SIN, COS, srow, P, 0, D0, D,
                                  HAS_NORM, HAS_ROPE, INTERPRET), DTYPE, INTERPRET)
    if HAS_D1:
        q1 = as_operand(prologue_cols(Q, q_row, offs_m, rmask, rstd, QW, SIN, COS, srow, P, D0, D1, D,
                                      HAS_NORM, HAS_ROPE, INTERPRET), DTYPE, INTERPRET)
    else:
        q1 = tl.zeros([BLOCK_M, D1], dtype=q0.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    k_base = (b * N).to(tl.int64) * SK + hk * D
    v_base = (b * N).to(tl.int64) * SV + hk * D
    n_full = (L // BLOCK_N) * BLOCK_N
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, SK, v_base, SV, L, 0, n_full,
                                      qk_scale, D, D0, D1, HAS_D1, BLOCK_N, False, PREC, DTYPE, INTERPRET)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K, V, k_base, SK, v_base, SV, L, n_full, L,
                                      qk_scale, D, D0, D1, HAS_D1, BLOCK_N, True, PREC, DTYPE, INTERPRET)
    valid = offs_m < L
    inv_l = 1.0 / l_i
    o0 = tl.where(valid[:, None], acc0 * inv_l[:, None], 0.0)
    c0 = tl.arange(0, D0)
    tl.store(O + o_row[:, None] + c0[None, :], as_operand(o0, DTYPE, INTERPRET), mask=rmask[:, None])
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        o1 = tl.where(valid[:, None], acc1 * inv_l[:, None], 0.0)
        tl.store(O + o_row[:, None] + c1[None, :], as_operand(o1, DTYPE, INTERPRET),
                 mask=rmask[:, None] & (c1[None, :] < D))
    lse = tl.where(valid, (m_i + tl.math.log2(l_i)) * _LN2, 0.0)
    tl.store(LSE + (b * H + h).to(tl.int64) * N + offs_m, lse, mask=rmask)



# ----------------------------------------------------------------------------------------------
# launch configuration and launcher


def fwd_config(D: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:  # IEEE fp32 dots: no tensor cores, small tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    # D = 128: two stages leave the registers for the q prologue (three spill with bf16 norm weights)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 if D < 128 else 2)


ROW_BLOCK = dict(BLOCK_R=32, num_warps=4, num_stages=1)


def prec(dtype: torch.dtype) -> str:
    return "ieee" if (dtype == torch.float32 or _INTERPRET) else "tf32"


def token_stride(x) -> int:
    """Elements between consecutive tokens of a (B, N, heads, D) tensor whose heads x D block is
    contiguous and whose batch stride is N tokens (a contiguous tensor, or a slot of a packed qkv)."""
    B, N, heads, D = x.shape
    ok = x.stride(3) == 1 and (heads == 1 or x.stride(2) == D) and (B == 1 or x.stride(0) == N * x.stride(1))
    assert ok, f"attention kernels take contiguous head rows, got strides {x.stride()}"
    return x.stride(1) if N > 1 else heads * D


def norm_rope(x, w, sin, cos, p, sin_bstride, eps, dummy):
    """rope(norm(x) * w) of (B, N, heads, D) x (possibly token-strided) into a new contiguous tensor of
    x's dtype (one launch)."""
    B, N, heads, D = x.shape
    D0, D1, has_d1 = split_head_dim(D)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    R = B * N * heads
    _norm_rope_kernel[(triton.cdiv(R, ROW_BLOCK["BLOCK_R"]),)](
        x, y, dummy if w is None else w, dummy if sin is None else sin, dummy if cos is None else cos,
        R, N, heads, p, sin_bstride, token_stride(x), eps,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_NORM=w is not None, HAS_ROPE=sin is not None,
        BLOCK_R=ROW_BLOCK["BLOCK_R"], INTERPRET=_INTERPRET,
        num_warps=ROW_BLOCK["num_warps"], num_stages=ROW_BLOCK["num_stages"],
    )
    return y


def attention_fwd(q, k, v, q_norm_weight, k_norm_weight, sin, cos, num_prefix_tokens, seq_lens, scale, norm_eps):
    """``(o (B, N, H, D) in q's dtype, lse (B, H, N) fp32)``; see the module docstring."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    p = int(num_prefix_tokens)
    has_norm = q_norm_weight is not None
    sin, cos, sin_bstride = tables(sin, cos)
    has_rope = sin is not None
    D0, D1, has_d1 = split_head_dim(D)
    dummy = q.new_empty(0)  # never read: stands in for absent optional pointers
    kp = norm_rope(k, k_norm_weight, sin, cos, p, sin_bstride, norm_eps, dummy) if (has_norm or has_rope) else k
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    cfg = fwd_config(D, q.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, kp, v, o, lse, q_norm_weight if has_norm else dummy, sin if has_rope else dummy,
        cos if has_rope else dummy, seq_lens if seq_lens is not None else dummy,
        N, H, G, p, sin_bstride, token_stride(q), token_stride(kp), token_stride(v), float(norm_eps),
        float(scale) * LOG2E,
        D=D, D0=D0, D1=D1, HAS_D1=has_d1, HAS_NORM=has_norm, HAS_ROPE=has_rope, HAS_LENS=seq_lens is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=prec(q.dtype), INTERPRET=_INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, lse


def attention_bwd(*args, **kwargs):
    """The backward launcher (``attention_bwd.attention_bwd``), re-exported."""
    from .attention_bwd import attention_bwd as bwd

    return bwd(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# shipped configurations (AOT compile gate: sm_90a, no spills, shared memory <= 227 KiB)

FLAGS = ((False, False), (True, False), (False, True), (True, True))  # (norm, rope)
HEAD_DIMS = (64, 76, 80, 128)
SCALARS = dict(N="i32", H="i32", G="i32", P="i32", R="i32", HEADS="i32", SIN_BSTRIDE="i32", eps="fp32",
               qk_scale="fp32", scale="fp32", NQ="i32", NK_PARTS="i32", RQ="i32", RK="i32", HKV="i32",
               NPROG="i32", BPART_W="i32", SX="i32", SQ="i32", SK="i32", SV="i32", SKR="i32", SQR="i32", SDQ="i32", SDK="i32",
               SDV="i32")


STRIDES = ("SX", "SQ", "SK", "SV", "SKR", "SQR", "SDQ", "SDK", "SDV")


def is_real(dt: str, D: int, norm: bool, rope: bool, pt: str) -> bool:
    """Whether a config is one the Sapiens2 model launches (the CI compile gate's set): bf16, its head
    dims, the trunk's QK-norm + RoPE prologue (or none, the unfused path) with parameters in bf16. The
    other flag and dtype combinations are compiled by ``compile_gate --all``."""
    return dt == "bf16" and D in (64, 76, 80) and norm == rope and pt == dt


def add_config(out: list, name: str, fn, types: dict, constexprs: dict, cfg: dict, real: bool = False) -> None:
    sig = signature(fn, {**SCALARS, **types}, constexprs)
    # what the runtime JIT specialises on: torch allocations are 16-byte aligned, and the token strides
    # (heads x D, or (H + 2 Hkv) x D for packed q/k/v) are multiples of 16 at every Sapiens2 shape
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in STRIDES}
    out.append({"name": name, "fn": fn, "signature": sig, "constexprs": constexprs, "attrs": attrs,
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "real": real})


def head_dim_constexprs(D: int) -> dict:
    D0, D1, has_d1 = split_head_dim(D)
    return dict(D=D, D0=D0, D1=D1, HAS_D1=has_d1, INTERPRET=False)


def _fwd_shipped(out: list) -> None:
    for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = "*" + dt
        for D in HEAD_DIMS:
            hd = head_dim_constexprs(D)
            cfg = fwd_config(D, tdt)
            for norm, rope in FLAGS:
                # parameters (norm weights, RoPE tables) in the activations' dtype or fp32
                for pt in ((dt, "fp32") if (norm or rope) else (dt,)):
                    par = "*" + pt
                    for lens in (False, True):
                        add_config(out, f"attn_fwd_{dt}_d{D}_norm{int(norm)}_rope{int(rope)}_par{pt}_lens{int(lens)}",
                                   _attn_fwd_kernel,
                                   dict(Q=x, K=x, V=x, O=x, LSE="*fp32", QW=par, SIN=par, COS=par, SEQ_LENS="*i64"),
                                   dict(hd, HAS_NORM=norm, HAS_ROPE=rope, HAS_LENS=lens, BLOCK_M=cfg["BLOCK_M"],
                                        BLOCK_N=cfg["BLOCK_N"], PREC="tf32"), cfg, is_real(dt, D, norm, rope, pt))
                    if norm or rope:
                        add_config(out, f"norm_rope_{dt}_d{D}_norm{int(norm)}_rope{int(rope)}_par{pt}", _norm_rope_kernel,
                                   dict(X=x, Y=x, W=par, SIN=par, COS=par),
                                   dict(hd, HAS_NORM=norm, HAS_ROPE=rope, BLOCK_R=ROW_BLOCK["BLOCK_R"]), ROW_BLOCK,
                                   is_real(dt, D, norm, rope, pt))


def _shipped_configs() -> list:
    from .attention_bwd import shipped_bwd_configs

    out: list = []
    _fwd_shipped(out)
    shipped_bwd_configs(out)
    return out


def __getattr__(name: str):
    # built on first access (the backward module imports this one)
    if name == "SHIPPED_CONFIGS":
        global SHIPPED_CONFIGS
        SHIPPED_CONFIGS = _shipped_configs()
        return SHIPPED_CONFIGS
    raise AttributeError(name)
