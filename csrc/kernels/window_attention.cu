// Window attention (w x w windows, optional per-window prefix / CLS row, optional key mask) and
// CLS pooling, forward and backward: SIMT kernels for the 4K tokenizer's tiny windows (17 rows of
// D = 64..80 per window-head: ~8.5 FLOP per byte, memory-bound, no tensor-core tile to fill).
// Semantics: sapiens2/ops/window_attention.py; C API: window_attention.h.
//
// Work unit: one (batch, window, head), numbered u = (b*nW + window)*heads + head, so that a block's
// units are neighbouring heads of the same tokens (their D-rows are adjacent in memory). A block
// takes G consecutive units (G*S <= ~128 rows, S = P + w*w rows per unit, within a shared-memory
// budget of two blocks per SM) and runs in phases separated by barriers:
//
//   prologue  per row: its token index (grid: window (i, j) by index arithmetic, no permute;
//             windows: consecutive) and, with a token_mask, whether the key is valid;
//   load      the units' rows, coalesced (consecutive threads read consecutive 4-element chunks of
//             a token's heads x D block), converted to fp32 into shared-memory tiles
//             [unit][row][Dp] (Dp = D or D + 4, Dp/4 odd: the 128-bit accesses of 8 threads to 8
//             consecutive rows hit distinct banks);
//   compute   window attention: one thread per query row (S threads per unit). Its S scores are
//             registers (SMAX = 5 / 17 / 65 fully unrolled), so the softmax needs no reduction
//             across threads; scores/outputs are fp32 dot products over 4-wide shared-memory
//             vectors (one 128-bit load per 4 FMAs, K / V rows broadcast to the unit's threads);
//   store     coalesced, from the tiles (the forward's O overwrites its own Q row in place).
//
// Forward (per query row i):  s_j = q_i . k_j, m = max over valid keys, p_j = exp(s_j*scale -
//   m*scale) (one fma, one rounding before the exp), lse_i = m*scale + log(sum p) (natural log, as the
//   reference), o_i = sum_j p_j v_j / sum p.
//   A row without a valid key (every key masked, no prefix) gets o = 0 and lse = 0.
// Backward (flash-style, P recomputed from the saved lse): delta_i = dO_i . O_i (accumulated while
//   dO and O are loaded: O is never staged), p_ij = exp(s_ij*scale - lse_i),
//   dS_ij = p_ij (dO_i . v_j - delta_i) scale. Phase 1, thread = query i: P and dS into shared
//   memory (transposed, [key][query]). Then, each into the tile of an operand dead by then:
//   phase 2 (thread = key j) dV_j = sum_i p_ij dO_i into the V tile, phase 3 (thread = query i)
//   dQ_i = sum_j dS_ij k_j into the dO tile, phase 4 (thread = key j) dK_j = sum_i dS_ij q_i into
//   the K tile; each result tile is stored coalesced (through the outputs' row strides: dq, dk,
//   dv may be the slots of one packed dqkv) during the next phase, and, for the q/k/v bias
//   gradient, summed over its rows as rounded for the store into the window's fp32 partial row.
//   A window's keys are attended by that window's queries only: no atomics, no zero-fill, every
//   output byte written once.
// cls_pool: one query per unit (the CLS), keys = its CLS key + the w*w tokens. Forward: scores
//   (thread per (unit, key)), softmax (thread per unit), o = sum_j p_j v_j (thread per 4-wide
//   chunk of D, V read straight from global memory, coalesced). Backward likewise, P recomputed
//   by the forward's own softmax and delta = sum_j p_j dP_j (the row is short and whole: neither
//   the saved lse nor O is read), with
//   dK_j = dS_j cq, dV_j = p_j dO, dcq = sum_j dS_j k_j (dck, dcv are the j = 0 terms).
//
// Global traffic: every input byte is read once per kernel and every output byte (the bias
// partials included) written once (asserted by the emulator's byte accounting in
// tests/cuda/test_window_attention_cuda.py, packed gradient buffers tracked whole); the bool
// token_mask (1 byte per token) is read once per head. Strided inputs (q, k, v as views of a fused
// QKV output) and strided gradient outputs (slots of a packed dqkv) cost nothing extra: rows are
// addressed as b*sb + row*st + head*D.
// Accesses are 4 elements wide (16 B in fp32, 8 B in fp16/bf16) when every pointer and stride
// allows it, else scalar.
#include "device_common.cuh"
#include "window_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>

namespace s2 {
namespace window_attention_kernels {

constexpr int kMaxThreads = 256;  // launch bound; window blocks use <= 128 threads, cls blocks <= 256
constexpr int kTargetRows = 128;  // rows (= threads of the window kernels) a block aims at
constexpr int kMaxHeadDim = 256;
constexpr int kMaxRows = 65;  // P + w*w: windows up to 8x8 with a prefix

enum Kind : int {
  kFwd = S2_WA_KERNEL_FWD,
  kBwd = S2_WA_KERNEL_BWD,
  kClsFwd = S2_WA_KERNEL_CLS_FWD,
  kClsBwd = S2_WA_KERNEL_CLS_BWD
};

// ---- small vectors ----------------------------------------------------------------------------

struct alignas(16) F4 {
  float x, y, z, w;
};

__device__ __forceinline__ F4 zero4() { return F4{0.0f, 0.0f, 0.0f, 0.0f}; }

// Shared-memory float4 (the tiles are 16-byte aligned, Dp a multiple of 4).
__device__ __forceinline__ F4 lds4(const float* p) {
#ifdef SAPIENS2_EMU
  F4 r;
  std::memcpy(&r, p, sizeof(F4));
  return r;
#else
  return *reinterpret_cast<const F4*>(p);
#endif
}

__device__ __forceinline__ void sts4(float* p, const F4& v) {
#ifdef SAPIENS2_EMU
  std::memcpy(p, &v, sizeof(F4));
#else
  *reinterpret_cast<F4*>(p) = v;
#endif
}

__device__ __forceinline__ float dot4(const F4& a, const F4& b) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, a.w * b.w)));
}

// acc += a * b lane by lane: a long dot product kept as four partial sums (summed by sum4 at the
// end) rounds like a 4-way blocked sum, not a 1-way chain.
__device__ __forceinline__ void fma4(F4& acc, const F4& a, const F4& b) {
  acc.x = fmaf(a.x, b.x, acc.x);
  acc.y = fmaf(a.y, b.y, acc.y);
  acc.z = fmaf(a.z, b.z, acc.z);
  acc.w = fmaf(a.w, b.w, acc.w);
}

__device__ __forceinline__ float sum4(const F4& a) { return (a.x + a.y) + (a.z + a.w); }

__device__ __forceinline__ void axpy4(F4& acc, float s, const F4& b) {
  acc.x = fmaf(s, b.x, acc.x);
  acc.y = fmaf(s, b.y, acc.y);
  acc.z = fmaf(s, b.z, acc.z);
  acc.w = fmaf(s, b.w, acc.w);
}

__device__ __forceinline__ F4 scale4(const F4& a, float s) { return F4{a.x * s, a.y * s, a.z * s, a.w * s}; }

__device__ __forceinline__ void add4(F4& acc, const F4& b) {
  acc.x += b.x;
  acc.y += b.y;
  acc.z += b.z;
  acc.w += b.w;
}

// The values as a store to T rounds them.
template <class T>
__device__ __forceinline__ F4 round4(const F4& a) {
  return F4{round_to<T>(a.x), round_to<T>(a.y), round_to<T>(a.z), round_to<T>(a.w)};
}

// 4 consecutive elements of global memory as fp32: one 4-element vector access when `vec`.
template <class T>
__device__ __forceinline__ F4 gload4(const T* p, bool vec) {
  if (vec) {
    const Vec<T, 4> v = gload_vec<T, 4>(p);
    return F4{to_f32(v.v[0]), to_f32(v.v[1]), to_f32(v.v[2]), to_f32(v.v[3])};
  }
  return F4{to_f32(gload(p)), to_f32(gload(p + 1)), to_f32(gload(p + 2)), to_f32(gload(p + 3))};
}

template <class T>
__device__ __forceinline__ void gstore4(T* p, const F4& x, bool vec) {
  if (vec) {
    Vec<T, 4> v;
    v.v[0] = from_f32<T>(x.x);
    v.v[1] = from_f32<T>(x.y);
    v.v[2] = from_f32<T>(x.z);
    v.v[3] = from_f32<T>(x.w);
    gstore_vec<T, 4>(p, v);
  } else {
    gstore(p, from_f32<T>(x.x));
    gstore(p + 1, from_f32<T>(x.y));
    gstore(p + 2, from_f32<T>(x.z));
    gstore(p + 3, from_f32<T>(x.w));
  }
}

// ---- parameters and shared memory --------------------------------------------------------------

// A (B, rows, heads, D) input: batch and row strides in elements; heads and D contiguous.
struct View {
  const void* p;
  int64_t sb, st;
};

// A (B, rows, heads, D) output, likewise: e.g. dq, dk, dv as the slots of one packed dqkv.
struct OView {
  void* p;
  int64_t sb, st;
};

struct Params {
  // inputs: token tensors (B, L, heads, D), prefix / CLS tensors (B, nW, heads, D)
  View q, k, v, pq, pk, pv, dout, dpo, o, po;
  const unsigned char* mask;  // (B, L) or null
  const float* lse;           // backward: the forward's lse
  // outputs: token (B, L, heads, D), prefix (B, nW, heads, D) (the forward's contiguous, the
  // gradients strided), lse; bias partials fp32 (B*nW, 3, heads, D) or null
  OView out, out_pre, dq, dk, dv, dq_pre, dk_pre, dv_pre;
  float* lse_out;
  float* bias;
  int64_t units;  // B * nW * heads
  int64_t L, nW, nWc, gw;
  int H, D, w, P, S, G, Dp, C, Cr, Sr, grid, vec, bias_vec;
  float scale;
};

// The dynamic shared memory of a block of G units, carved in 16-byte aligned pieces (tiles first).
// With base == nullptr only `bytes` is computed (the host's sizing uses the same code).
struct Smem {
  float *t0, *t1, *t2, *t3;  // [G][S][Dp] tiles (cls: t2 / t3 are [G][Dp] rows)
  float *pt, *dst;           // window bwd: P and dS transposed, [G][S (key)][Sr (query)]; cls: [G][S]
  float *dpart;              // delta partials: window bwd [G][S][Cr]
  float *valid;              // [G][S] key validity (1 / 0)
  int *pos, *ub, *uh;        // [G][S] token (or window) index of each row; [G] batch, head
  size_t bytes;
};

struct Carver {
  char* base;
  size_t off;
  template <class U>
  __host__ __device__ U* take(size_t n) {
    const size_t bytes = (n * sizeof(U) + 15) & ~size_t(15);
    U* p = base != nullptr ? reinterpret_cast<U*>(base + off) : nullptr;
    off += bytes;
    return p;
  }
};

__host__ __device__ inline Smem carve(int kind, int G, int S, int Dp, int Cr, int Sr, char* base) {
  Carver c{base, 0};
  Smem s{};
  const size_t tile = size_t(G) * S * Dp, rows = size_t(G) * S;
  switch (kind) {
    case kFwd:
      s.t0 = c.take<float>(tile);  // Q, then O
      s.t1 = c.take<float>(tile);  // K
      s.t2 = c.take<float>(tile);  // V
      s.valid = c.take<float>(rows);
      break;
    case kBwd:
      s.t0 = c.take<float>(tile);  // Q
      s.t1 = c.take<float>(tile);  // K, then dK
      s.t2 = c.take<float>(tile);  // V, then dV
      s.t3 = c.take<float>(tile);  // dO
      s.pt = c.take<float>(size_t(G) * S * Sr);
      s.dst = c.take<float>(size_t(G) * S * Sr);
      s.dpart = c.take<float>(rows * Cr);
      s.valid = c.take<float>(rows);
      break;
    case kClsFwd:
      s.t0 = c.take<float>(tile);                 // [CLS key; keys]
      s.t2 = c.take<float>(size_t(G) * Dp);       // CLS query
      s.pt = c.take<float>(rows);                 // scores, then probabilities
      break;
    default:                                      // kClsBwd
      s.t0 = c.take<float>(tile);                 // [CLS key; keys]
      s.t1 = c.take<float>(tile);                 // [CLS value; values]
      s.t2 = c.take<float>(size_t(G) * Dp);       // CLS query
      s.t3 = c.take<float>(size_t(G) * Dp);       // dO
      s.pt = c.take<float>(rows);                 // p
      s.dst = c.take<float>(rows);                // dS
      break;
  }
  s.pos = c.take<int>(rows);
  s.ub = c.take<int>(size_t(G));
  s.uh = c.take<int>(size_t(G));
  s.bytes = c.off;
  return s;
}

__host__ __device__ inline int padded_dim(int D) { return (D / 4) % 2 == 0 ? D + 4 : D; }

// ---- rows --------------------------------------------------------------------------------------

// Row (g, r) of the block: r < P is the unit's prefix (CLS) row, else token r - P of its window.
__device__ __forceinline__ void prologue(const Params& p, int64_t u0, int Ge, const Smem& s) {
  for (int t = threadIdx.x; t < Ge * p.S; t += blockDim.x) {
    // 32-bit index math (units, L, nW < 2^31, checked by the launcher): a 64-bit division would
    // be a subroutine call
    const unsigned g = unsigned(t) / unsigned(p.S), r = unsigned(t) - g * unsigned(p.S);
    const unsigned u = unsigned(u0) + g;
    const unsigned bw = u / unsigned(p.H);
    const int h = int(u - bw * unsigned(p.H));
    const unsigned b = bw / unsigned(p.nW);
    const unsigned widx = bw - b * unsigned(p.nW);
    int64_t pos;
    if (int(r) < p.P) {
      pos = widx;
    } else {
      const unsigned tt = r - unsigned(p.P), w = unsigned(p.w);
      if (p.grid) {
        const unsigned wi = widx / unsigned(p.nWc), wj = widx - wi * unsigned(p.nWc);
        pos = (int64_t(wi) * w + tt / w) * p.gw + int64_t(wj) * w + tt % w;
      } else {
        pos = int64_t(widx) * (w * w) + tt;
      }
    }
    s.pos[t] = int(pos);
    if (r == 0) {
      s.ub[g] = int(b);
      s.uh[g] = h;
    }
    if (s.valid != nullptr)
      s.valid[t] = (int(r) < p.P || p.mask == nullptr || gload(p.mask + b * p.L + pos) != 0) ? 1.0f : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ const T* row_in(const View& v, const Smem& s, const Params& p, int g, int r) {
  return static_cast<const T*>(v.p) + int64_t(s.ub[g]) * v.sb + int64_t(s.pos[g * p.S + r]) * v.st +
         int64_t(s.uh[g]) * p.D;
}

// Row (g, r)'s output row: the unit's prefix row of `pre` (r < P) or its token's row of `tok`.
template <class T>
__device__ __forceinline__ T* row_out(const OView& tok, const OView& pre, const Smem& s, const Params& p, int g,
                                      int r) {
  const OView v = r < p.P ? pre : tok;  // by value, as in load_rows
  return static_cast<T*>(v.p) + int64_t(s.ub[g]) * v.sb + int64_t(s.pos[g * p.S + r]) * v.st +
         int64_t(s.uh[g]) * p.D;
}

// Chunk idx of the block's rows, in memory order: 4-element chunk c of unit g's row r, c fastest,
// then the unit (the neighbouring head), then the row.
struct Chunk {
  int g, r, c;
};

__device__ __forceinline__ Chunk chunk_of(int idx, int C, int Ge) {
  const int c = idx % C, rg = idx / C;
  return Chunk{rg % Ge, rg / Ge, c};
}

// tile[g][r][:] = rows of `tok` (r >= P) / `pre` (r < P; zeros when pre is absent), as fp32.
template <class T>
__device__ __forceinline__ void load_rows(float* tile, const View& tok, const View& pre, const Params& p, const Smem& s, int Ge) {
  const int n = Ge * p.S * p.C;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const Chunk k = chunk_of(idx, p.C, Ge);
    const View v = k.r < p.P ? pre : tok;  // by value: no dynamic address into the parameter space
    F4 x = zero4();
    if (v.p != nullptr) x = gload4(row_in<T>(v, s, p, k.g, k.r) + 4 * k.c, p.vec != 0);
    sts4(tile + (k.g * p.S + k.r) * p.Dp + 4 * k.c, x);
  }
}

// As load_rows for dO, and the partial dot products with O of each chunk into dpart (delta_i is
// their sum): O is read once and never staged. A prefix row without dpo is zeros (po unread).
template <class T>
__device__ __forceinline__ void load_dout_rows(float* tile, float* dpart, const Params& p, const Smem& s, int Ge) {
  const int n = Ge * p.S * p.C;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const Chunk k = chunk_of(idx, p.C, Ge);
    const bool pre = k.r < p.P;
    const View dv = pre ? p.dpo : p.dout;
    const View ov = pre ? p.po : p.o;
    F4 d = zero4(), o = zero4();
    if (dv.p != nullptr) {
      d = gload4(row_in<T>(dv, s, p, k.g, k.r) + 4 * k.c, p.vec != 0);
      o = gload4(row_in<T>(ov, s, p, k.g, k.r) + 4 * k.c, p.vec != 0);
    }
    const int row = k.g * p.S + k.r;
    sts4(tile + row * p.Dp + 4 * k.c, d);
    dpart[row * p.Cr + k.c] = dot4(d, o);
  }
}

template <class T>
__device__ __forceinline__ void store_rows(const float* tile, const OView& tok, const OView& pre, const Params& p,
                                           const Smem& s, int Ge) {
  const int n = Ge * p.S * p.C;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const Chunk k = chunk_of(idx, p.C, Ge);
    gstore4(row_out<T>(tok, pre, s, p, k.g, k.r) + 4 * k.c, lds4(tile + (k.g * p.S + k.r) * p.Dp + 4 * k.c),
            p.vec != 0);
  }
}

// Bias partials of one gradient tile (slot 0 dq, 1 dk, 2 dv): per unit, the column sums of its S
// rows as stored (rounded to T), tokens first, then the prefix row, into the unit's (slot, D) row
// of the fp32 (B*nW, 3, heads, D) partials. Thread per 4-wide chunk: reads along a row (no bank
// conflicts), coalesced stores.
template <class T>
__device__ __forceinline__ void store_bias(const float* tile, int slot, const Params& p, const Smem& s, int64_t u0,
                                           int Ge) {
  for (int idx = threadIdx.x; idx < Ge * p.C; idx += blockDim.x) {
    const int g = idx / p.C, c = idx - g * p.C;
    const float* col = tile + g * p.S * p.Dp + 4 * c;
    F4 acc = zero4();
    for (int r = p.P; r < p.S; ++r) add4(acc, round4<T>(lds4(col + r * p.Dp)));
    if (p.P) add4(acc, round4<T>(lds4(col)));
    const int h = s.uh[g];
    // unit u = bw*H + h -> row (bw*3 + slot)*H + h = 3*(u - h) + slot*H + h
    float* dst = p.bias + (3 * (u0 + g - h) + int64_t(slot) * p.H + h) * p.D + 4 * c;
    gstore4<float>(dst, acc, p.bias_vec != 0);
  }
}

// dst[g][:] = the unit's row of a (B, nW, heads, D) view (a CLS tensor), as fp32.
template <class T>
__device__ __forceinline__ void load_unit_rows(float* dst, const View& v, const Params& p, const Smem& s, int Ge) {
  for (int idx = threadIdx.x; idx < Ge * p.C; idx += blockDim.x) {
    const int g = idx / p.C, c = idx - g * p.C;
    const T* src = static_cast<const T*>(v.p) + int64_t(s.ub[g]) * v.sb + int64_t(s.pos[g * p.S]) * v.st +
                   int64_t(s.uh[g]) * p.D;
    sts4(dst + g * p.Dp + 4 * c, gload4(src + 4 * c, p.vec != 0));
  }
}

__device__ __forceinline__ int units_here(const Params& p, int64_t u0) {
  const int64_t left = p.units - u0;
  return int(left < p.G ? left : p.G);
}

// ---- window attention ----------------------------------------------------------------------------

// scores[j] = q . k_j over the unit's S key rows (kt: the unit's first key row).
template <int SMAX>
__device__ __forceinline__ void row_scores(float (&sc)[SMAX], const float* q, const float* kt, int S, int D,
                                           int Dp) {
#pragma unroll
  for (int j = 0; j < SMAX; ++j) sc[j] = 0.0f;
  for (int c = 0; c < D; c += 4) {
    const F4 qv = lds4(q + c);
#pragma unroll
    for (int j = 0; j < SMAX; ++j)
      if (j < S) sc[j] += dot4(qv, lds4(kt + j * Dp + c));
  }
}

// out[:] = sum_i a[i * as] x_i over the unit's S rows x_i (xt: its first row): the backward's
// three products, a row of P or dS (from registers, a 128-bit shared load per 4 FMAs) per thread.
template <int SMAX>
__device__ __forceinline__ void ab_rows(float* out, const float* a, int as, const float* xt, int S, int D, int Dp) {
  float r[SMAX];
#pragma unroll
  for (int i = 0; i < SMAX; ++i) r[i] = i < S ? a[i * as] : 0.0f;
  for (int c = 0; c < D; c += 4) {
    F4 acc = zero4();
#pragma unroll
    for (int i = 0; i < SMAX; ++i)
      if (i < S) axpy4(acc, r[i], lds4(xt + i * Dp + c));
    sts4(out + c, acc);
  }
}

template <class T, int SMAX>
__global__ void __launch_bounds__(kMaxThreads) window_attention_fwd_kernel(const Params p) {
  S2_DYNAMIC_SMEM(float, smem);
  const Smem s = carve(kFwd, p.G, p.S, p.Dp, p.Cr, p.Sr, reinterpret_cast<char*>(smem));
  const int64_t u0 = int64_t(blockIdx.x) * p.G;
  const int Ge = units_here(p, u0);
  const int S = p.S, Dp = p.Dp, D = p.D;

  prologue(p, u0, Ge, s);
  __syncthreads();
  load_rows<T>(s.t0, p.q, p.pq, p, s, Ge);
  load_rows<T>(s.t1, p.k, p.pk, p, s, Ge);
  load_rows<T>(s.t2, p.v, p.pv, p, s, Ge);
  __syncthreads();

  const int t = threadIdx.x;  // = g * S + i: query row i of unit g
  if (t < Ge * S) {
    const int g = t / S;
    const float* valid = s.valid + g * S;
    float* qrow = s.t0 + t * Dp;
    float sc[SMAX];
    row_scores<SMAX>(sc, qrow, s.t1 + g * S * Dp, S, D, Dp);
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < SMAX; ++j)
      if (j < S && valid[j] != 0.0f) m = fmaxf(m, sc[j]);
    const float ms = m == -INFINITY ? 0.0f : m * p.scale;
    float den = 0.0f;
#pragma unroll
    for (int j = 0; j < SMAX; ++j) {  // exp(s*scale - m*scale): one rounding before the exp
      const float e = (j < S && valid[j] != 0.0f) ? expf(fmaf(sc[j], p.scale, -ms)) : 0.0f;
      sc[j] = e;
      den += e;
    }
    const bool any = den > 0.0f;
    gstore(p.lse_out + u0 * S + t, any ? ms + logf(den) : 0.0f);
    const float inv = any ? 1.0f / den : 0.0f;
    const float* vt = s.t2 + g * S * Dp;
    for (int c = 0; c < D; c += 4) {  // o_i overwrites q_i (read only by this thread, already used)
      F4 acc = zero4();
#pragma unroll
      for (int j = 0; j < SMAX; ++j)
        if (j < S) axpy4(acc, sc[j], lds4(vt + j * Dp + c));
      sts4(qrow + c, scale4(acc, inv));
    }
  }
  __syncthreads();
  store_rows<T>(s.t0, p.out, p.out_pre, p, s, Ge);
}

// Min blocks 1: without it ptxas (sm_90a) capped the S = 17 variant at 48 registers and spilled;
// occupancy is bound by shared memory anyway (two blocks of <= 128 threads per SM).
template <class T, int SMAX>
__global__ void __launch_bounds__(kMaxThreads, 1) window_attention_bwd_kernel(const Params p) {
  S2_DYNAMIC_SMEM(float, smem);
  const Smem s = carve(kBwd, p.G, p.S, p.Dp, p.Cr, p.Sr, reinterpret_cast<char*>(smem));
  const int64_t u0 = int64_t(blockIdx.x) * p.G;
  const int Ge = units_here(p, u0);
  const int S = p.S, Dp = p.Dp, D = p.D, Sr = p.Sr;

  prologue(p, u0, Ge, s);
  __syncthreads();
  load_rows<T>(s.t0, p.q, p.pq, p, s, Ge);
  load_rows<T>(s.t1, p.k, p.pk, p, s, Ge);
  load_rows<T>(s.t2, p.v, p.pv, p, s, Ge);
  load_dout_rows<T>(s.t3, s.dpart, p, s, Ge);
  __syncthreads();

  const int t = threadIdx.x;
  const bool active = t < Ge * S;
  const int g = active ? t / S : 0;
  const int me = t - g * S;  // phase 1, 3: query row; phase 2, 4: key row
  float* ptg = s.pt + g * S * Sr;
  float* dstg = s.dst + g * S * Sr;
  if (active) {  // phase 1: thread = query row i: P and dS
    const float* valid = s.valid + g * S;
    float delta = 0.0f;
    for (int c = 0; c < p.C; ++c) delta += s.dpart[t * p.Cr + c];
    const float lse = gload(p.lse + u0 * S + t);
    float r[SMAX];
    row_scores<SMAX>(r, s.t0 + t * Dp, s.t1 + g * S * Dp, S, D, Dp);
#pragma unroll
    for (int j = 0; j < SMAX; ++j)
      if (j < S) ptg[j * Sr + me] = valid[j] != 0.0f ? expf(fmaf(r[j], p.scale, -lse)) : 0.0f;
    row_scores<SMAX>(r, s.t3 + t * Dp, s.t2 + g * S * Dp, S, D, Dp);  // dP_ij = dO_i . v_j
#pragma unroll
    for (int j = 0; j < SMAX; ++j)
      if (j < S) dstg[j * Sr + me] = ptg[j * Sr + me] * (r[j] - delta) * p.scale;
  }
  __syncthreads();
  // The three products, each into the tile of an operand that is dead by then (no extra shared
  // memory), each tile stored (and column-summed) in the phase after its own:
  //   phase 2: dV_j = sum_i p_ij dO_i   -> V tile  (V last read in phase 1)
  //   phase 3: dQ_i = sum_j dS_ij k_j   -> dO tile (dO last read in phase 2)
  //   phase 4: dK_j = sum_i dS_ij q_i   -> K tile  (K last read in phase 3)
  if (active) ab_rows<SMAX>(s.t2 + t * Dp, ptg + me * Sr, 1, s.t3 + g * S * Dp, S, D, Dp);
  __syncthreads();
  if (active) ab_rows<SMAX>(s.t3 + t * Dp, dstg + me, Sr, s.t1 + g * S * Dp, S, D, Dp);
  store_rows<T>(s.t2, p.dv, p.dv_pre, p, s, Ge);
  if (p.bias != nullptr) store_bias<T>(s.t2, 2, p, s, u0, Ge);
  __syncthreads();
  if (active) ab_rows<SMAX>(s.t1 + t * Dp, dstg + me * Sr, 1, s.t0 + g * S * Dp, S, D, Dp);
  store_rows<T>(s.t3, p.dq, p.dq_pre, p, s, Ge);
  if (p.bias != nullptr) store_bias<T>(s.t3, 0, p, s, u0, Ge);
  __syncthreads();
  store_rows<T>(s.t1, p.dk, p.dk_pre, p, s, Ge);
  if (p.bias != nullptr) store_bias<T>(s.t1, 1, p, s, u0, Ge);
}

// ---- cls_pool -----------------------------------------------------------------------------------
// Rows of a unit: 0 = the CLS key / value (P = 1), 1..w*w the window's tokens.

template <class T>
__global__ void __launch_bounds__(kMaxThreads) cls_pool_fwd_kernel(const Params p) {
  S2_DYNAMIC_SMEM(float, smem);
  const Smem s = carve(kClsFwd, p.G, p.S, p.Dp, p.Cr, p.Sr, reinterpret_cast<char*>(smem));
  const int64_t u0 = int64_t(blockIdx.x) * p.G;
  const int Ge = units_here(p, u0);
  const int S = p.S, Dp = p.Dp, D = p.D;

  prologue(p, u0, Ge, s);
  __syncthreads();
  load_unit_rows<T>(s.t2, p.pq, p, s, Ge);
  load_rows<T>(s.t0, p.k, p.pk, p, s, Ge);
  __syncthreads();
  for (int idx = threadIdx.x; idx < Ge * S; idx += blockDim.x) {  // scores, thread per (unit, key)
    const int g = idx / S;
    const float* q = s.t2 + g * Dp;
    const float* kr = s.t0 + idx * Dp;
    float acc = 0.0f;
    for (int c = 0; c < D; c += 4) acc += dot4(lds4(q + c), lds4(kr + c));
    s.pt[idx] = acc * p.scale;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < Ge; g += blockDim.x) {  // softmax, thread per unit
    float* sc = s.pt + g * S;
    float m = sc[0];
    for (int j = 1; j < S; ++j) m = fmaxf(m, sc[j]);
    float den = 0.0f;
    for (int j = 0; j < S; ++j) {
      const float e = expf(sc[j] - m);
      sc[j] = e;
      den += e;
    }
    const float inv = 1.0f / den;
    for (int j = 0; j < S; ++j) sc[j] *= inv;
    gstore(p.lse_out + u0 + g, m + logf(den));
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Ge * p.C; idx += blockDim.x) {  // o = sum_j p_j v_j, chunk per thread
    const int g = idx / p.C, c = idx - g * p.C;
    const float* pr = s.pt + g * S;
    F4 acc = zero4();
    for (int j = 0; j < S; ++j)
      axpy4(acc, pr[j], gload4(row_in<T>(j < 1 ? p.pv : p.v, s, p, g, j) + 4 * c, p.vec != 0));
    gstore4(static_cast<T*>(p.out.p) + (u0 + g) * D + 4 * c, acc, p.vec != 0);
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads) cls_pool_bwd_kernel(const Params p) {
  S2_DYNAMIC_SMEM(float, smem);
  const Smem s = carve(kClsBwd, p.G, p.S, p.Dp, p.Cr, p.Sr, reinterpret_cast<char*>(smem));
  const int64_t u0 = int64_t(blockIdx.x) * p.G;
  const int Ge = units_here(p, u0);
  const int S = p.S, Dp = p.Dp, D = p.D;

  prologue(p, u0, Ge, s);
  __syncthreads();
  load_unit_rows<T>(s.t2, p.pq, p, s, Ge);
  for (int idx = threadIdx.x; idx < Ge * p.C; idx += blockDim.x) {  // dO
    const int g = idx / p.C, c = idx - g * p.C;
    const int64_t off = int64_t(s.ub[g]) * p.dout.sb + int64_t(s.pos[g * S]) * p.dout.st + int64_t(s.uh[g]) * D;
    sts4(s.t3 + g * Dp + 4 * c, gload4(static_cast<const T*>(p.dout.p) + off + 4 * c, p.vec != 0));
  }
  load_rows<T>(s.t0, p.k, p.pk, p, s, Ge);
  load_rows<T>(s.t1, p.v, p.pv, p, s, Ge);
  __syncthreads();
  for (int idx = threadIdx.x; idx < Ge * S; idx += blockDim.x) {  // scores, dO . v_j: thread per (unit, key)
    const int g = idx / S;
    const float* q = s.t2 + g * Dp;
    const float* d = s.t3 + g * Dp;
    const float* kr = s.t0 + idx * Dp;
    const float* vr = s.t1 + idx * Dp;
    F4 sq = zero4(), dp = zero4();
    for (int c = 0; c < D; c += 4) {
      fma4(sq, lds4(q + c), lds4(kr + c));
      fma4(dp, lds4(d + c), lds4(vr + c));
    }
    s.pt[idx] = sum4(sq) * p.scale;
    s.dst[idx] = sum4(dp);
  }
  __syncthreads();
  // p_j, dS_j: thread per unit. The unit's whole row is at hand, so the softmax is recomputed as the
  // forward computes it (max, exp, sum) and delta = sum_j p_j (dO . v_j) directly, rather than
  // p_j = exp(s*scale - lse) and delta = dO . O as a flash backward must: the saved lse carries a
  // rounding of |lse| * eps that the exp turns into a relative error of p, and O its own rounding,
  // which dS = p (dP - delta) amplifies where dP and delta nearly cancel (in fp32 that put dV and
  // the CLS dK over the tolerance rule). Neither lse nor O is read.
  for (int g = threadIdx.x; g < Ge; g += blockDim.x) {
    float* sc = s.pt + g * S;
    float* ds = s.dst + g * S;
    float m = sc[0];
    for (int j = 1; j < S; ++j) m = fmaxf(m, sc[j]);
    // the row's two sums (up to 65 terms, once per unit) in float64: a 1-way float32 chain of that
    // length rounds several times worse than the reference's blocked sums, at no measurable cost here
    double den = 0.0;
    for (int j = 0; j < S; ++j) {
      const float e = expf(sc[j] - m);
      sc[j] = e;
      den += double(e);
    }
    const float inv = float(1.0 / den);
    double acc = 0.0;
    for (int j = 0; j < S; ++j) {
      sc[j] *= inv;
      acc = fma(double(sc[j]), double(ds[j]), acc);
    }
    const float delta = float(acc);
    for (int j = 0; j < S; ++j) ds[j] = sc[j] * (ds[j] - delta) * p.scale;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Ge * p.C; idx += blockDim.x) {  // thread per 4-wide chunk of D
    const int g = idx / p.C, c = idx - g * p.C;
    const F4 q = lds4(s.t2 + g * Dp + 4 * c);
    const F4 d = lds4(s.t3 + g * Dp + 4 * c);
    F4 dcq = zero4();
#pragma unroll 1  // two stores per key: unrolling buys nothing (and made ptxas spill for fp32 on sm_80)
    for (int j = 0; j < S; ++j) {
      const float ds = s.dst[g * S + j], pj = s.pt[g * S + j];
      gstore4(row_out<T>(p.dk, p.dk_pre, s, p, g, j) + 4 * c, scale4(q, ds), p.vec != 0);
      gstore4(row_out<T>(p.dv, p.dv_pre, s, p, g, j) + 4 * c, scale4(d, pj), p.vec != 0);
      axpy4(dcq, ds, lds4(s.t0 + (g * S + j) * Dp + 4 * c));
    }
    gstore4(row_out<T>(p.dq, p.dq_pre, s, p, g, 0) + 4 * c, dcq, p.vec != 0);
  }
}

// ---- host side -----------------------------------------------------------------------------------

inline int64_t device_attr(int attr, int64_t fallback) {
#ifdef SAPIENS2_EMU
  (void)attr;
  return fallback;
#else
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, static_cast<cudaDeviceAttr>(attr), dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  return v;
#endif
}

inline int64_t smem_limit() {
#ifdef SAPIENS2_EMU
  return 227 * 1024;  // the emulator models sm_90
#else
  return device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);
#endif
}

inline int64_t smem_per_sm() {
#ifdef SAPIENS2_EMU
  return 228 * 1024;
#else
  return device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, 100 * 1024);
#endif
}

inline bool cls_kind(int kind) { return kind == kClsFwd || kind == kClsBwd; }

inline int rows_of(int kind, int64_t w, bool prefix) { return int(w * w) + ((prefix || cls_kind(kind)) ? 1 : 0); }

inline size_t unit_bytes(int kind, int G, int S, int D) {
  return carve(kind, G, S, padded_dim(D), (D / 4) | 1, S | 1, nullptr).bytes;
}

inline bool dims_ok(int64_t w, int64_t D, int S) {
  return w >= 1 && D >= 4 && D <= kMaxHeadDim && D % 4 == 0 && S <= kMaxRows;
}

struct Plan {
  int G = 0, threads = 0;
  size_t smem = 0;
};

// Units per block: about kTargetRows rows, within half of an SM's shared memory (two blocks per SM)
// unless a single unit needs more.
inline Plan plan(int kind, int S, int D, int64_t units) {
  Plan pl;
  const int64_t limit = smem_limit();
  if (int64_t(unit_bytes(kind, 1, S, D)) > limit) return pl;
  const int64_t budget = std::min<int64_t>(limit, smem_per_sm() / 2 - 1024);
  int G = std::max(1, kTargetRows / S);
  G = int(std::min<int64_t>(G, std::max<int64_t>(units, 1)));
  while (G > 1 && int64_t(unit_bytes(kind, G, S, D)) > budget) --G;
  const int C = D / 4;
  const int rows = cls_kind(kind) ? std::max(G * S, G * C) : G * S;
  pl.G = G;
  pl.threads = std::min(kMaxThreads, (rows + 31) / 32 * 32);
  pl.smem = unit_bytes(kind, G, S, D);
  return pl;
}

struct Geometry {
  int64_t nW = 0, nWc = 0;
};

// Shapes the kernels take; kBadShape otherwise.
inline int geometry(int64_t B, int64_t L, int64_t H, int64_t D, int64_t gh, int64_t gw, int64_t w, int layout,
                    int S, bool has_mask, Geometry& g) {
  if (!dims_ok(w, D, S) || B < 0 || L < 0 || H < 1 || gh < 0 || gw < 0 || (layout != 0 && layout != 1))
    return kBadShape;
  if (gh % w != 0 || gw % w != 0) return kBadShape;
  if (layout == 0) {
    if (L != gh * gw) return kBadShape;
    g.nW = (gh / w) * (gw / w);
  } else {
    if (has_mask || L % (w * w) != 0) return kBadShape;
    g.nW = L / (w * w);
  }
  g.nWc = gw / w;
  const int64_t kInt = 0x7fffffff;
  if (L > kInt || B > kInt || H > kInt || g.nW > kInt || (g.nW > 0 && B * g.nW > kInt / H)) return kBadShape;
  return kOk;
}

inline bool view_aligned(const View& v, size_t bytes) {
  if (v.p == nullptr) return true;
  return (reinterpret_cast<uintptr_t>(v.p) % bytes) == 0 && v.sb % 4 == 0 && v.st % 4 == 0;
}

template <class T>
bool all_vec(const Params& p) {
  const size_t b = 4 * sizeof(T);
  for (const View* v : {&p.q, &p.k, &p.v, &p.pq, &p.pk, &p.pv, &p.dout, &p.dpo, &p.o, &p.po})
    if (!view_aligned(*v, b)) return false;
  for (const OView* o : {&p.out, &p.out_pre, &p.dq, &p.dk, &p.dv, &p.dq_pre, &p.dk_pre, &p.dv_pre})
    if (!view_aligned(View{o->p, o->sb, o->st}, b)) return false;
  return true;
}

// A contiguous (B, rows, heads, D) output.
inline OView dense(void* p, int64_t rows, int64_t H, int64_t D) { return OView{p, rows * H * D, H * D}; }

inline Params base_params(int64_t B, int64_t L, int64_t H, int64_t D, int64_t gw, int64_t w, int layout, int S,
                          int P, const Geometry& g, float scale) {
  Params p{};
  p.units = B * g.nW * H;
  p.L = L;
  p.nW = g.nW;
  p.nWc = g.nWc;
  p.gw = gw;
  p.H = int(H);
  p.D = int(D);
  p.w = int(w);
  p.P = P;
  p.S = S;
  p.Dp = padded_dim(int(D));
  p.C = int(D) / 4;
  p.Cr = p.C | 1;
  p.Sr = S | 1;
  p.grid = layout == 0 ? 1 : 0;
  p.scale = scale;
  return p;
}

template <class T>
int launch(int kind, Params p, void* stream) {
  if (p.units == 0) return kOk;
  const Plan pl = plan(kind, p.S, p.D, p.units);
  if (pl.G == 0) return kBadShape;
  p.G = pl.G;
  p.vec = all_vec<T>(p) ? 1 : 0;
  p.bias_vec = p.bias != nullptr && aligned16(p.bias) ? 1 : 0;
  const int64_t blocks = (p.units + pl.G - 1) / pl.G;
  if (blocks > 0x7fffffff) return kBadShape;
  const dim3 grid{unsigned(blocks)}, block{unsigned(pl.threads)};
  const size_t smem = pl.smem;
#define S2_WA_GO(KERNEL)                                                 \
  do {                                                                   \
    S2_SET_MAX_DYNAMIC_SMEM(KERNEL, smem);                               \
    S2_LAUNCH(KERNEL, grid, block, smem, stream, p);                     \
  } while (0)
  switch (kind) {
    case kFwd:
      if (p.S <= 5) S2_WA_GO((window_attention_fwd_kernel<T, 5>));
      else if (p.S <= 17) S2_WA_GO((window_attention_fwd_kernel<T, 17>));
      else S2_WA_GO((window_attention_fwd_kernel<T, 65>));
      break;
    case kBwd:
      if (p.S <= 5) S2_WA_GO((window_attention_bwd_kernel<T, 5>));
      else if (p.S <= 17) S2_WA_GO((window_attention_bwd_kernel<T, 17>));
      else S2_WA_GO((window_attention_bwd_kernel<T, 65>));
      break;
    case kClsFwd:
      S2_WA_GO((cls_pool_fwd_kernel<T>));
      break;
    default:
      S2_WA_GO((cls_pool_bwd_kernel<T>));
      break;
  }
#undef S2_WA_GO
  return S2_LAUNCH_STATUS();
}

}  // namespace window_attention_kernels
}  // namespace s2

namespace wak = s2::window_attention_kernels;

extern "C" {

int64_t s2_window_attention_smem_bytes(int kernel, int64_t window, int has_prefix, int64_t head_dim) {
  if (kernel < 0 || kernel > 3 || window < 1 || window > 8) return -1;
  const int S = wak::rows_of(kernel, window, has_prefix != 0);
  if (!wak::dims_ok(window, head_dim, S)) return -1;
  return int64_t(wak::unit_bytes(kernel, 1, S, int(head_dim)));
}

int64_t s2_window_attention_smem_limit(void) { return wak::smem_limit(); }

int s2_window_attention_fwd(int dtype, const void* q, int64_t q_sb, int64_t q_st, const void* k, int64_t k_sb,
                            int64_t k_st, const void* v, int64_t v_sb, int64_t v_st, const void* pq, int64_t pq_sb,
                            int64_t pq_st, const void* pk, int64_t pk_sb, int64_t pk_st, const void* pv,
                            int64_t pv_sb, int64_t pv_st, const uint8_t* token_mask, void* o, void* po, float* lse,
                            int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim, int64_t grid_h,
                            int64_t grid_w, int64_t window, int layout, float scale, void* stream) {
  const bool prefix = pq != nullptr;
  if (prefix && (pk == nullptr || pv == nullptr || po == nullptr)) return s2::kBadShape;
  if (window < 1 || window > 8) return s2::kBadShape;
  const int P = prefix ? 1 : 0, S = int(window * window) + P;
  wak::Geometry g;
  const int st = wak::geometry(batch, tokens, heads, head_dim, grid_h, grid_w, window, layout, S,
                               token_mask != nullptr, g);
  if (st != s2::kOk) return st;
  wak::Params p = wak::base_params(batch, tokens, heads, head_dim, grid_w, window, layout, S, P, g, scale);
  p.q = {q, q_sb, q_st};
  p.k = {k, k_sb, k_st};
  p.v = {v, v_sb, v_st};
  if (prefix) {
    p.pq = {pq, pq_sb, pq_st};
    p.pk = {pk, pk_sb, pk_st};
    p.pv = {pv, pv_sb, pv_st};
    p.out_pre = wak::dense(po, g.nW, heads, head_dim);
  }
  p.mask = token_mask;
  p.out = wak::dense(o, tokens, heads, head_dim);
  p.lse_out = lse;
  S2_DISPATCH_DTYPE(dtype, T, return wak::launch<T>(wak::kFwd, p, stream));
  return s2::kBadDType;
}

int s2_window_attention_bwd(int dtype, const void* dout, int64_t dout_sb, int64_t dout_st, const void* dpo,
                            int64_t dpo_sb, int64_t dpo_st, const void* q, int64_t q_sb, int64_t q_st,
                            const void* k, int64_t k_sb, int64_t k_st, const void* v, int64_t v_sb, int64_t v_st,
                            const void* pq, int64_t pq_sb, int64_t pq_st, const void* pk, int64_t pk_sb,
                            int64_t pk_st, const void* pv, int64_t pv_sb, int64_t pv_st, const uint8_t* token_mask,
                            const void* o, int64_t o_sb, int64_t o_st, const void* po, int64_t po_sb,
                            int64_t po_st, const float* lse, void* dq, int64_t dq_sb, int64_t dq_st, void* dk,
                            int64_t dk_sb, int64_t dk_st, void* dv, int64_t dv_sb, int64_t dv_st, void* dpq,
                            int64_t dpq_sb, int64_t dpq_st, void* dpk, int64_t dpk_sb, int64_t dpk_st, void* dpv,
                            int64_t dpv_sb, int64_t dpv_st, float* bias_partials, int64_t batch, int64_t tokens,
                            int64_t heads, int64_t head_dim,
                            int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale, void* stream) {
  const bool prefix = pq != nullptr;
  if (prefix && (pk == nullptr || pv == nullptr || dpq == nullptr || dpk == nullptr || dpv == nullptr ||
                 (dpo != nullptr && po == nullptr)))
    return s2::kBadShape;
  if (!prefix && dpo != nullptr) return s2::kBadShape;
  if (window < 1 || window > 8) return s2::kBadShape;
  const int P = prefix ? 1 : 0, S = int(window * window) + P;
  wak::Geometry g;
  const int st = wak::geometry(batch, tokens, heads, head_dim, grid_h, grid_w, window, layout, S,
                               token_mask != nullptr, g);
  if (st != s2::kOk) return st;
  wak::Params p = wak::base_params(batch, tokens, heads, head_dim, grid_w, window, layout, S, P, g, scale);
  p.dout = {dout, dout_sb, dout_st};
  p.o = {o, o_sb, o_st};
  p.q = {q, q_sb, q_st};
  p.k = {k, k_sb, k_st};
  p.v = {v, v_sb, v_st};
  if (prefix) {
    p.pq = {pq, pq_sb, pq_st};
    p.pk = {pk, pk_sb, pk_st};
    p.pv = {pv, pv_sb, pv_st};
    if (dpo != nullptr) {
      p.dpo = {dpo, dpo_sb, dpo_st};
      p.po = {po, po_sb, po_st};
    }
    p.dq_pre = {dpq, dpq_sb, dpq_st};
    p.dk_pre = {dpk, dpk_sb, dpk_st};
    p.dv_pre = {dpv, dpv_sb, dpv_st};
  }
  p.mask = token_mask;
  p.lse = lse;
  p.dq = {dq, dq_sb, dq_st};
  p.dk = {dk, dk_sb, dk_st};
  p.dv = {dv, dv_sb, dv_st};
  p.bias = bias_partials;
  S2_DISPATCH_DTYPE(dtype, T, return wak::launch<T>(wak::kBwd, p, stream));
  return s2::kBadDType;
}

int s2_cls_pool_fwd(int dtype, const void* cq, int64_t cq_sb, int64_t cq_st, const void* ck, int64_t ck_sb,
                    int64_t ck_st, const void* cv, int64_t cv_sb, int64_t cv_st, const void* k, int64_t k_sb,
                    int64_t k_st, const void* v, int64_t v_sb, int64_t v_st, void* o, float* lse, int64_t batch,
                    int64_t tokens, int64_t heads, int64_t head_dim, int64_t grid_h, int64_t grid_w, int64_t window,
                    int layout, float scale, void* stream) {
  if (window < 1 || window > 8) return s2::kBadShape;
  const int S = int(window * window) + 1;
  wak::Geometry g;
  const int st = wak::geometry(batch, tokens, heads, head_dim, grid_h, grid_w, window, layout, S, false, g);
  if (st != s2::kOk) return st;
  wak::Params p = wak::base_params(batch, tokens, heads, head_dim, grid_w, window, layout, S, 1, g, scale);
  p.pq = {cq, cq_sb, cq_st};
  p.pk = {ck, ck_sb, ck_st};
  p.pv = {cv, cv_sb, cv_st};
  p.k = {k, k_sb, k_st};
  p.v = {v, v_sb, v_st};
  p.out = wak::dense(o, g.nW, heads, head_dim);
  p.lse_out = lse;
  S2_DISPATCH_DTYPE(dtype, T, return wak::launch<T>(wak::kClsFwd, p, stream));
  return s2::kBadDType;
}

int s2_cls_pool_bwd(int dtype, const void* dout, int64_t dout_sb, int64_t dout_st, const void* cq, int64_t cq_sb,
                    int64_t cq_st, const void* ck, int64_t ck_sb, int64_t ck_st, const void* cv, int64_t cv_sb,
                    int64_t cv_st, const void* k, int64_t k_sb, int64_t k_st, const void* v, int64_t v_sb,
                    int64_t v_st, const void* o, int64_t o_sb, int64_t o_st, const float* lse, void* dcq,
                    int64_t dcq_sb, int64_t dcq_st, void* dck, int64_t dck_sb, int64_t dck_st, void* dcv,
                    int64_t dcv_sb, int64_t dcv_st, void* dk, int64_t dk_sb, int64_t dk_st, void* dv, int64_t dv_sb,
                    int64_t dv_st, int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                    int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale, void* stream) {
  if (window < 1 || window > 8) return s2::kBadShape;
  const int S = int(window * window) + 1;
  wak::Geometry g;
  const int st = wak::geometry(batch, tokens, heads, head_dim, grid_h, grid_w, window, layout, S, false, g);
  if (st != s2::kOk) return st;
  wak::Params p = wak::base_params(batch, tokens, heads, head_dim, grid_w, window, layout, S, 1, g, scale);
  p.dout = {dout, dout_sb, dout_st};
  p.o = {o, o_sb, o_st};
  p.pq = {cq, cq_sb, cq_st};
  p.pk = {ck, ck_sb, ck_st};
  p.pv = {cv, cv_sb, cv_st};
  p.k = {k, k_sb, k_st};
  p.v = {v, v_sb, v_st};
  p.lse = lse;
  p.dq_pre = {dcq, dcq_sb, dcq_st};
  p.dk_pre = {dck, dck_sb, dck_st};
  p.dv_pre = {dcv, dcv_sb, dcv_st};
  p.dk = {dk, dk_sb, dk_st};
  p.dv = {dv, dv_sb, dv_st};
  S2_DISPATCH_DTYPE(dtype, T, return wak::launch<T>(wak::kClsBwd, p, stream));
  return s2::kBadDType;
}

}  // extern "C"
