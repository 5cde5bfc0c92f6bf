// Per-head QK-RMSNorm followed by rotate-half 2D RoPE, for q and k in one launch, forward and
// backward (SIMT, memory-bound).
//
// Semantics are those of sapiens2.ops.qk_norm_rope (see sapiens2/ops/qk_norm_rope.py), with the
// RoPE in fp32 as the Triton kernels compute it. Per head vector x of D elements, halves
// x1 = x[:D/2], x2 = x[D/2:], token n, table row t = n - prefix:
//   forward   rstd = 1 / sqrt(mean(x^2) + eps)           (fp32, saved)
//             xn = x * rstd * w
//             out1 = xn1 * cos1 - xn2 * sin1,  out2 = xn2 * cos2 + xn1 * sin2   (n >= prefix)
//             out = xn                                                          (n <  prefix)
//   backward  RoPE rotates each pair (i, i + D/2), so its backward is the transposed rotation:
//             d1 = g1 * cos1 + g2 * sin2,  d2 = g2 * cos2 - g1 * sin1   (d = g for n < prefix)
//             then the RMSNorm backward with xhat = x * rstd:
//             dx = rstd * (d * w - xhat * mean(d * w * xhat)),  dw = sum over head vectors (d * xhat)
//
// Layout: a group of `lanes` lanes (a power of two <= 32) owns one head vector; lane l holds the
// pairs (x1[i], x2[i]) for i in its vectors of VEC consecutive elements (i = (c * lanes + l) * VEC
// + j), so the rotation needs no data from other lanes and only the two sums (sum x^2, sum
// d*w*xhat) cross lanes, by xor-shuffles inside the group. A block handles one token position n at
// a time for its range of samples, the q heads then the k heads of each token spread over its
// groups (all lanes run every round, idle ones with zeros, so the shuffles and barriers stay
// converged). The sin/cos row of the position is staged once in shared memory and serves every
// head and, for tables shared by the samples, every sample of the block: tables, q, k and the
// gradients are read exactly once, every output written once. The norm weights are staged once
// per block. The backward's weight gradients are per-thread fp32 running sums in shared memory,
// summed over the block's groups in a fixed order into one partial row per block (no atomics;
// s2_column_sum reduces the rows).
#include "device_common.cuh"
#include "qk_norm_rope.h"

#include <algorithm>
#include <initializer_list>
#include <type_traits>

namespace s2 {
namespace qk_norm_rope_kernels {

constexpr int kMaxThreads = 256;
// Two resident blocks per SM: caps registers at 128, which the widest case (D = 512 unvectorised,
// 16 elements per lane) fits without spills; left to itself ptxas picks 64 and spills.
constexpr int kMinBlocksPerSM = 2;
constexpr int kMaxHeadDim = 512;
// D / 2 <= 256 pairs over a group of 32 lanes.
constexpr int kMaxPairsPerLane = kMaxHeadDim / 2 / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridY = 65535;

struct Shape {
  int64_t batch, tokens, q_heads, k_heads, prefix;
  int head_dim, half;  // D, D / 2
  int lanes;           // lanes per head vector
  int chunks;          // vectors of VEC pairs per lane
  int per_sample_tables;
};

// Sum over the lanes of a group (xor partners below `lanes` stay inside the group). Every lane of
// the warp calls it: `m < lanes` is the same in the whole block.
__device__ __forceinline__ float group_sum(float v, int lanes) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1)
    if (m < lanes) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Where this thread sits: its group (one head vector at a time), its lane in the group.
struct Place {
  int group, groups, lane;
};

__device__ __forceinline__ Place place(const Shape& s) {
  return {int(threadIdx.x) / s.lanes, int(blockDim.x) / s.lanes, int(threadIdx.x) % s.lanes};
}

// The norm weights of q (row 0) and k (row 1) in fp32, once per block.
__device__ __forceinline__ void stage_weights(float (*weight)[kMaxHeadDim], const void* q_weight,
                                              const void* k_weight, int param_dtype, int D) {
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    weight[0][c] = load_param_f32(q_weight, param_dtype, c);
    weight[1][c] = load_param_f32(k_weight, param_dtype, c);
  }
}

// The sin (row 0) and cos (row 1) of token (b, n), n >= prefix. The leading barrier keeps the
// previous row until every thread is done with it; the trailing one publishes the new row.
__device__ __forceinline__ void stage_table(float (*table)[kMaxHeadDim], const float* sin, const float* cos,
                                            const Shape& s, int64_t b, int64_t n) {
  __syncthreads();
  const int64_t row = ((s.per_sample_tables ? b : 0) * (s.tokens - s.prefix) + (n - s.prefix)) * s.head_dim;
  for (int c = threadIdx.x; c < s.head_dim; c += blockDim.x) {
    table[0][c] = gload(sin + row + c);
    table[1][c] = gload(cos + row + c);
  }
  __syncthreads();
}

// The samples [begin, end) of this block row.
__device__ __forceinline__ void sample_range(const Shape& s, int64_t& begin, int64_t& end) {
  begin = int64_t(blockIdx.y) * s.batch / gridDim.y;
  end = int64_t(blockIdx.y + 1) * s.batch / gridDim.y;
}

// Head slot h of a token: q heads first, then k heads. `row` indexes the head vector (and its
// rstd) in q or k.
struct Head {
  bool live, is_q;
  int64_t row;
};

__device__ __forceinline__ Head head_of(const Shape& s, int64_t token, int64_t h) {
  if (h >= s.q_heads + s.k_heads) return {false, false, 0};
  if (h < s.q_heads) return {true, true, token * s.q_heads + h};
  return {true, false, token * s.k_heads + (h - s.q_heads)};
}

template <class T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM) qk_norm_rope_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const void* __restrict__ q_weight,
    const void* __restrict__ k_weight, int param_dtype, const float* __restrict__ sin, const float* __restrict__ cos,
    T* __restrict__ q_out, T* __restrict__ k_out, float* __restrict__ q_rstd, float* __restrict__ k_rstd, Shape s,
    float eps) {
  constexpr int MAXC = kMaxPairsPerLane / VEC;
  __shared__ float weight[2][kMaxHeadDim];
  __shared__ float table[2][kMaxHeadDim];
  stage_weights(weight, q_weight, k_weight, param_dtype, s.head_dim);
  __syncthreads();
  const Place p = place(s);
  const int64_t rounds = (s.q_heads + s.k_heads + p.groups - 1) / p.groups;
  const float inv_d = __frcp_rn(float(s.head_dim));  // exact-rounded under fast-math too
  int64_t b_begin, b_end;
  sample_range(s, b_begin, b_end);
  for (int64_t n = blockIdx.x; n < s.tokens; n += gridDim.x) {
    const bool rotate = sin != nullptr && n >= s.prefix;
    for (int64_t b = b_begin; b < b_end; ++b) {
      if (rotate && (b == b_begin || s.per_sample_tables)) stage_table(table, sin, cos, s, b, n);
      const int64_t token = b * s.tokens + n;
      for (int64_t head_round = 0; head_round < rounds; ++head_round) {
        const Head hd = head_of(s, token, head_round * p.groups + p.group);
        const T* x = (hd.is_q ? q : k) + hd.row * s.head_dim;
        const float* w = weight[hd.is_q ? 0 : 1];
        float x1[MAXC][VEC], x2[MAXC][VEC];
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int i = (c * s.lanes + p.lane) * VEC;
          if (hd.live && c < s.chunks && i < s.half) {
            load_f32<T, VEC>(x + i, x1[c]);
            load_f32<T, VEC>(x + s.half + i, x2[c]);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) x1[c][j] = x2[c][j] = 0.0f;
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) ss += x1[c][j] * x1[c][j] + x2[c][j] * x2[c][j];
        }
        const float rstd = rsqrtf(group_sum(ss, s.lanes) * inv_d + eps);
        if (!hd.live) continue;  // after the shuffles: the rest has no cross-lane step
        T* out = (hd.is_q ? q_out : k_out) + hd.row * s.head_dim;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int i = (c * s.lanes + p.lane) * VEC;
          if (c >= s.chunks || i >= s.half) continue;
          float o1[VEC], o2[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float n1 = x1[c][j] * rstd * w[i + j];
            const float n2 = x2[c][j] * rstd * w[s.half + i + j];
            if (rotate) {
              o1[j] = n1 * table[1][i + j] - n2 * table[0][i + j];
              o2[j] = n2 * table[1][s.half + i + j] + n1 * table[0][s.half + i + j];
            } else {
              o1[j] = n1;
              o2[j] = n2;
            }
          }
          store_f32<T, VEC>(out + i, o1);
          store_f32<T, VEC>(out + s.half + i, o2);
        }
        if (p.lane == 0) gstore((hd.is_q ? q_rstd : k_rstd) + hd.row, rstd);
      }
    }
  }
}

// Shared-memory slot of the running weight-gradient sum of pair element (c, j), half `hi` (0: i,
// 1: i + D/2), for q (which 0) or k (which 1): slot-major so that a warp touches consecutive words.
__device__ __forceinline__ int acc_index(int which, int slots, int c, int vec, int j, int hi, int thread) {
  return (which * slots + (c * vec + j) * 2 + hi) * int(blockDim.x) + thread;
}

template <class T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM) qk_norm_rope_bwd_kernel(
    const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ q, const T* __restrict__ k,
    const void* __restrict__ q_weight, const void* __restrict__ k_weight, int param_dtype,
    const float* __restrict__ sin, const float* __restrict__ cos, const float* __restrict__ q_rstd,
    const float* __restrict__ k_rstd, T* __restrict__ dq_in, T* __restrict__ dk_in,
    float* __restrict__ dq_weight_part, float* __restrict__ dk_weight_part, Shape s) {
  constexpr int MAXC = kMaxPairsPerLane / VEC;
  __shared__ float weight[2][kMaxHeadDim];
  __shared__ float table[2][kMaxHeadDim];
  S2_DYNAMIC_SMEM(float, acc);  // [2][slots][blockDim.x]
  const int slots = 2 * s.chunks * VEC;
  for (int t = 0; t < 2 * slots; ++t) acc[t * blockDim.x + threadIdx.x] = 0.0f;  // own slots: no barrier
  stage_weights(weight, q_weight, k_weight, param_dtype, s.head_dim);
  __syncthreads();
  const Place p = place(s);
  const int64_t rounds = (s.q_heads + s.k_heads + p.groups - 1) / p.groups;
  const float inv_d = __frcp_rn(float(s.head_dim));  // exact-rounded under fast-math too
  int64_t b_begin, b_end;
  sample_range(s, b_begin, b_end);
  for (int64_t n = blockIdx.x; n < s.tokens; n += gridDim.x) {
    const bool rotate = sin != nullptr && n >= s.prefix;
    for (int64_t b = b_begin; b < b_end; ++b) {
      if (rotate && (b == b_begin || s.per_sample_tables)) stage_table(table, sin, cos, s, b, n);
      const int64_t token = b * s.tokens + n;
      for (int64_t head_round = 0; head_round < rounds; ++head_round) {
        const Head hd = head_of(s, token, head_round * p.groups + p.group);
        const int which = hd.is_q ? 0 : 1;
        const int64_t base = hd.row * s.head_dim;
        const T* g = (hd.is_q ? dq : dk) + base;
        const T* x = (hd.is_q ? q : k) + base;
        const float* w = weight[which];
        // rstd read once per head vector, by the group's first lane
        float rstd = 0.0f;
        if (hd.live && p.lane == 0) rstd = gload((hd.is_q ? q_rstd : k_rstd) + hd.row);
        rstd = __shfl_sync(kFullMask, rstd, 0, s.lanes);
        // Keep d * w and xhat per element; d * xhat goes straight to the weight-gradient sums.
        float gw1[MAXC][VEC], gw2[MAXC][VEC], xh1[MAXC][VEC], xh2[MAXC][VEC];
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int i = (c * s.lanes + p.lane) * VEC;
          const bool mine = hd.live && c < s.chunks && i < s.half;
          float g1[VEC], g2[VEC];
          if (mine) {
            load_f32<T, VEC>(g + i, g1);
            load_f32<T, VEC>(g + s.half + i, g2);
            load_f32<T, VEC>(x + i, xh1[c]);
            load_f32<T, VEC>(x + s.half + i, xh2[c]);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) g1[j] = g2[j] = xh1[c][j] = xh2[c][j] = 0.0f;
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            float d1 = g1[j], d2 = g2[j];
            if (rotate && mine) {
              d1 = g1[j] * table[1][i + j] + g2[j] * table[0][s.half + i + j];
              d2 = g2[j] * table[1][s.half + i + j] - g1[j] * table[0][i + j];
            }
            xh1[c][j] *= rstd;
            xh2[c][j] *= rstd;
            gw1[c][j] = mine ? d1 * w[i + j] : 0.0f;
            gw2[c][j] = mine ? d2 * w[s.half + i + j] : 0.0f;
            dot += gw1[c][j] * xh1[c][j] + gw2[c][j] * xh2[c][j];
            if (mine) {
              acc[acc_index(which, slots, c, VEC, j, 0, threadIdx.x)] += d1 * xh1[c][j];
              acc[acc_index(which, slots, c, VEC, j, 1, threadIdx.x)] += d2 * xh2[c][j];
            }
          }
        }
        const float mean_dot = group_sum(dot, s.lanes) * inv_d;
        if (!hd.live) continue;  // after the shuffles
        T* dx = (hd.is_q ? dq_in : dk_in) + base;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
          const int i = (c * s.lanes + p.lane) * VEC;
          if (c >= s.chunks || i >= s.half) continue;
          float o1[VEC], o2[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            o1[j] = rstd * (gw1[c][j] - xh1[c][j] * mean_dot);
            o2[j] = rstd * (gw2[c][j] - xh2[c][j] * mean_dot);
          }
          store_f32<T, VEC>(dx + i, o1);
          store_f32<T, VEC>(dx + s.half + i, o2);
        }
      }
    }
  }
  // This block's partial weight gradients: for column e, the slot of lane (e / VEC) % lanes in every
  // group, summed in group order.
  __syncthreads();
  const int64_t part_row = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int which = 0; which < 2; ++which) {
    float* part = (which == 0 ? dq_weight_part : dk_weight_part) + part_row * s.head_dim;
    for (int e = threadIdx.x; e < s.head_dim; e += blockDim.x) {
      const int hi = e >= s.half ? 1 : 0;
      const int i = e - hi * s.half;
      const int c = i / (s.lanes * VEC), lane = (i / VEC) % s.lanes, j = i % VEC;
      float sum = 0.0f;
      for (int group = 0; group < p.groups; ++group)
        sum += acc[acc_index(which, slots, c, VEC, j, hi, group * s.lanes + lane)];
      gstore(part + e, sum);
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

inline bool aligned_to(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Widest vector (16 bytes, 2 elements or 1) that divides D/2 and every activation pointer's
// alignment. D/2 is even (D is a multiple of 4), so 2 always divides it.
template <class T>
int pick_vec(int half, std::initializer_list<const void*> ptrs) {
  auto all = [&](size_t bytes) {
    for (const void* ptr : ptrs)
      if (!aligned_to(ptr, bytes)) return false;
    return true;
  };
  if (half % vec_width<T>() == 0 && all(16)) return vec_width<T>();
  if (all(2 * sizeof(T))) return 2;
  return 1;
}

inline Shape make_shape(int64_t batch, int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                        int64_t prefix, int per_sample_tables, int vec) {
  Shape s{};
  s.batch = batch;
  s.tokens = tokens;
  s.q_heads = q_heads;
  s.k_heads = k_heads;
  s.prefix = prefix;
  s.head_dim = int(head_dim);
  s.half = int(head_dim / 2);
  const int vectors = s.half / vec;
  s.lanes = 1;
  while (s.lanes < 32 && s.lanes < vectors) s.lanes *= 2;
  s.chunks = (vectors + s.lanes - 1) / s.lanes;
  s.per_sample_tables = per_sample_tables;
  return s;
}

// Enough warps for every head vector of a token in one round, at most 8.
inline int block_threads(const Shape& s) {
  const int64_t lanes = (s.q_heads + s.k_heads) * s.lanes;
  const int64_t warps = std::clamp<int64_t>((lanes + 31) / 32, 1, kMaxThreads / 32);
  return int(warps * 32);
}

inline bool valid(int64_t batch, int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                  int64_t prefix, const float* sin, const float* cos, int programs, int sample_splits) {
  if (batch < 0 || tokens < 0 || q_heads < 0 || k_heads < 0) return false;
  if (!s2_qk_norm_rope_supports_head_dim(head_dim)) return false;
  if ((sin == nullptr) != (cos == nullptr)) return false;
  if (sin != nullptr && (prefix < 0 || prefix > tokens)) return false;
  return programs > 0 && sample_splits > 0 && sample_splits <= kMaxGridY;
}

template <class T, class Launch>
int with_vec(int vec, Launch&& launch) {
  switch (vec) {
    case vec_width<T>():
      launch(std::integral_constant<int, vec_width<T>()>{});
      break;
    case 2:
      launch(std::integral_constant<int, 2>{});
      break;
    default:
      launch(std::integral_constant<int, 1>{});
      break;
  }
  return S2_LAUNCH_STATUS();
}

template <class T>
int fwd(int param_dtype, const void* q, const void* k, const void* q_weight, const void* k_weight, const float* sin,
        const float* cos, void* q_out, void* k_out, float* q_rstd, float* k_rstd, int64_t batch, int64_t tokens,
        int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t prefix, int per_sample_tables, float eps,
        int programs, int sample_splits, void* stream) {
  const int vec = pick_vec<T>(int(head_dim / 2), {q, k, q_out, k_out});
  const Shape s = make_shape(batch, tokens, q_heads, k_heads, head_dim, prefix, per_sample_tables, vec);
  return with_vec<T>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    S2_LAUNCH((qk_norm_rope_fwd_kernel<T, VEC>), dim3(unsigned(programs), unsigned(sample_splits)),
              dim3(block_threads(s)), 0, stream, static_cast<const T*>(q), static_cast<const T*>(k), q_weight,
              k_weight, param_dtype, sin, cos, static_cast<T*>(q_out), static_cast<T*>(k_out), q_rstd, k_rstd, s,
              eps);
  });
}

template <class T>
int bwd(int param_dtype, const void* dq, const void* dk, const void* q, const void* k, const void* q_weight,
        const void* k_weight, const float* sin, const float* cos, const float* q_rstd, const float* k_rstd,
        void* dq_in, void* dk_in, float* dq_weight_part, float* dk_weight_part, int64_t batch, int64_t tokens,
        int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t prefix, int per_sample_tables, int programs,
        int sample_splits, void* stream) {
  const int vec = pick_vec<T>(int(head_dim / 2), {dq, dk, q, k, dq_in, dk_in});
  const Shape s = make_shape(batch, tokens, q_heads, k_heads, head_dim, prefix, per_sample_tables, vec);
  const int threads = block_threads(s);
  const size_t smem = size_t(2) * 2 * s.chunks * vec * threads * sizeof(float);
  return with_vec<T>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    S2_SET_MAX_DYNAMIC_SMEM((qk_norm_rope_bwd_kernel<T, VEC>), smem);
    S2_LAUNCH((qk_norm_rope_bwd_kernel<T, VEC>), dim3(unsigned(programs), unsigned(sample_splits)), dim3(threads),
              smem, stream, static_cast<const T*>(dq), static_cast<const T*>(dk), static_cast<const T*>(q),
              static_cast<const T*>(k), q_weight, k_weight, param_dtype, sin, cos, q_rstd, k_rstd,
              static_cast<T*>(dq_in), static_cast<T*>(dk_in), dq_weight_part, dk_weight_part, s);
  });
}

}  // namespace qk_norm_rope_kernels
}  // namespace s2

extern "C" {

int s2_qk_norm_rope_supports_head_dim(int64_t head_dim) {
  return head_dim >= 4 && head_dim <= s2::qk_norm_rope_kernels::kMaxHeadDim && head_dim % 4 == 0;
}

int s2_qk_norm_rope_fwd(int dtype, int param_dtype, const void* q, const void* k, const void* q_weight,
                        const void* k_weight, const float* sin, const float* cos, void* q_out, void* k_out,
                        float* q_rstd, float* k_rstd, int64_t batch, int64_t tokens, int64_t q_heads,
                        int64_t k_heads, int64_t head_dim, int64_t prefix, int per_sample_tables, float eps,
                        int programs, int sample_splits, void* stream) {
  namespace k_ = s2::qk_norm_rope_kernels;
  if (!k_::valid(batch, tokens, q_heads, k_heads, head_dim, prefix, sin, cos, programs, sample_splits))
    return s2::kBadShape;
  if (batch * tokens == 0) return s2::kOk;
  programs = int(std::min<int64_t>(programs, tokens));
  sample_splits = int(std::min<int64_t>(sample_splits, batch));
  S2_DISPATCH_DTYPE(dtype, T,
                    return k_::fwd<T>(param_dtype, q, k, q_weight, k_weight, sin, cos, q_out, k_out, q_rstd, k_rstd,
                                      batch, tokens, q_heads, k_heads, head_dim, prefix, per_sample_tables, eps,
                                      programs, sample_splits, stream));
  return s2::kBadDType;
}

int s2_qk_norm_rope_bwd(int dtype, int param_dtype, const void* dq, const void* dk, const void* q, const void* k,
                        const void* q_weight, const void* k_weight, const float* sin, const float* cos,
                        const float* q_rstd, const float* k_rstd, void* dq_in, void* dk_in, float* dq_weight_part,
                        float* dk_weight_part, int64_t batch, int64_t tokens, int64_t q_heads, int64_t k_heads,
                        int64_t head_dim, int64_t prefix, int per_sample_tables, int programs, int sample_splits,
                        void* stream) {
  namespace k_ = s2::qk_norm_rope_kernels;
  // No early return without tokens: every block still writes its (zero) partial rows, and the
  // partial buffers have `programs * sample_splits` rows as given.
  if (!k_::valid(batch, tokens, q_heads, k_heads, head_dim, prefix, sin, cos, programs, sample_splits))
    return s2::kBadShape;
  S2_DISPATCH_DTYPE(dtype, T,
                    return k_::bwd<T>(param_dtype, dq, dk, q, k, q_weight, k_weight, sin, cos, q_rstd, k_rstd, dq_in,
                                      dk_in, dq_weight_part, dk_weight_part, batch, tokens, q_heads, k_heads,
                                      head_dim, prefix, per_sample_tables, programs, sample_splits, stream));
  return s2::kBadDType;
}

}  // extern "C"
