// RMSNorm and residual add (+ LayerScale) + RMSNorm, forward and backward (SIMT, memory-bound).
//
// Semantics are those of sapiens2.ops.rms_norm (see sapiens2/ops/rms_norm.py):
//   forward   h = round_T(residual + round_T(s * x))   (h = x without a residual)
//             rstd = 1 / sqrt(mean(h^2) + eps)        (fp32, saved)
//             y = round_T(h * rstd * w)
//   backward  xhat = h * rstd, g = dy * w
//             gh = rstd * (g - xhat * mean(g * xhat)) + dh
//             dres = gh, dx = gh * s, dw = sum_rows(dy * xhat), ds = sum_rows(gh * x)
//
// Layout: a persistent grid of `programs` blocks walks the rows (row = block, block + programs,
// ...). Each thread owns NV vectors of VEC columns for the whole launch, so w and s are read once
// per block, a row is read once into registers (x, residual, dy, dh, h: each exactly once) and
// every output is written once. The weight gradients are per-block fp32 partial rows
// (programs x C, no atomics), summed by s2_column_sum; the forward keeps no partials.
#include "device_common.cuh"
#include "rms_norm.h"

#include <initializer_list>
#include <type_traits>

namespace s2 {
namespace {

// Register budget (no spills on sm_90a / sm_80 with or without --use_fast_math, checked by the
// compile gate): at most 8 elements per thread at 1024 threads, 16 at 768 threads; the scalar path
// (per-element addresses) at most 4.
constexpr int max_threads_for(int elems_per_thread) { return elems_per_thread > 8 ? 768 : 1024; }
constexpr int max_elems_per_thread(int vec) { return vec == 1 ? 4 : 16; }

// Load VEC consecutive elements starting at column c of a row into fp32 (zeros past C).
template <class T, int VEC>
__device__ __forceinline__ void load_row(const T* row, int64_t c, int64_t C, float* out) {
  if (c < C) {
    load_f32<T, VEC>(row + c, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = 0.0f;
  }
}

template <class T, int VEC>
__device__ __forceinline__ void store_row(T* row, int64_t c, int64_t C, const float* in) {
  if (c < C) store_f32<T, VEC>(row + c, in);
}

template <class T, int NV, int VEC>
__global__ void __launch_bounds__(max_threads_for(NV * VEC), 1) rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                            const void* __restrict__ x_scale, const void* __restrict__ w,
                                                            int param_dtype, T* __restrict__ y, T* __restrict__ h,
                                                            float* __restrict__ rstd_out, int64_t rows, int64_t C,
                                                            float eps) {
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * C;
    float v[NV][VEC];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      load_row<T, VEC>(x + base, c, C, v[i]);
      if (residual != nullptr) {
        float r[VEC];
        load_row<T, VEC>(residual + base, c, C, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float s = (x_scale != nullptr && c + j < C) ? load_param_f32(x_scale, param_dtype, c + j) : 1.0f;
          const float scaled = x_scale != nullptr ? round_to<T>(v[i][j] * s) : v[i][j];
          v[i][j] = round_to<T>(r[j] + scaled);  // the stream as PyTorch stores it
        }
        store_row<T, VEC>(h + base, c, C, v[i]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += v[i][j] * v[i][j];
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / float(C) + eps);
    if (threadIdx.x == 0) gstore(rstd_out + row, rstd);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out[j] = c + j < C ? v[i][j] * rstd * load_param_f32(w, param_dtype, c + j) : 0.0f;
      store_row<T, VEC>(y + base, c, C, out);
    }
  }
}

// The per-block weight-gradient partials live in dynamic shared memory, slot (i * VEC + j) *
// blockDim.x + threadIdx.x for the thread's element (i, j): each thread only touches its own slots
// (no barrier needed) and a warp's accesses hit 32 consecutive words (no bank conflicts).
template <class T, int NV, int VEC>
__global__ void __launch_bounds__(max_threads_for(NV * VEC)) rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                                                            const T* __restrict__ x, const T* __restrict__ h,
                                                            const void* __restrict__ x_scale, const void* __restrict__ w,
                                                            int param_dtype, const float* __restrict__ rstd_in,
                                                            T* __restrict__ dx, T* __restrict__ dres,
                                                            float* __restrict__ dw_part, float* __restrict__ ds_part,
                                                            int64_t rows, int64_t C) {
  __shared__ float scratch[32];
  S2_DYNAMIC_SMEM(float, partials);
  const unsigned slots = NV * VEC * blockDim.x;
  float* dw = partials;
  float* ds = partials + slots;
#pragma unroll
  for (int k = 0; k < NV * VEC; ++k) {
    dw[k * blockDim.x + threadIdx.x] = 0.0f;
    if (x_scale != nullptr) ds[k * blockDim.x + threadIdx.x] = 0.0f;
  }
  // rstd is read once per row by thread 0 and shared (double-buffered by row parity: a slot is
  // rewritten only two rows later, after a barrier every thread passes once it has read it).
  __shared__ float row_rstd[2];
  int parity = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x, parity ^= 1) {
    const int64_t base = row * C;
    if (threadIdx.x == 0) row_rstd[parity] = gload(rstd_in + row);
    float hv[NV][VEC], d[NV][VEC];
    float dot = 0.0f;  // sum(g * h); times rstd it is sum(g * xhat)
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      load_row<T, VEC>(h + base, c, C, hv[i]);
      load_row<T, VEC>(dy + base, c, C, d[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (c + j < C) dot += d[i][j] * load_param_f32(w, param_dtype, c + j) * hv[i][j];
    }
    const float total = block_sum(dot, scratch);  // its barriers also publish row_rstd
    const float rstd = row_rstd[parity];
    const float mean_dot = total * rstd / float(C);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      float gh[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xh = hv[i][j] * rstd;
        const float g = c + j < C ? d[i][j] * load_param_f32(w, param_dtype, c + j) : 0.0f;
        dw[(i * VEC + j) * blockDim.x + threadIdx.x] += d[i][j] * xh;
        gh[j] = rstd * (g - xh * mean_dot);
      }
      if (dh != nullptr) {
        float e[VEC];
        load_row<T, VEC>(dh + base, c, C, e);
#pragma unroll
        for (int j = 0; j < VEC; ++j) gh[j] += e[j];
      }
      if (dres != nullptr) {
        store_row<T, VEC>(dres + base, c, C, gh);
        if (x_scale != nullptr) {
          float xv[VEC], out[VEC];
          load_row<T, VEC>(x + base, c, C, xv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            ds[(i * VEC + j) * blockDim.x + threadIdx.x] += gh[j] * xv[j];
            out[j] = c + j < C ? gh[j] * load_param_f32(x_scale, param_dtype, c + j) : 0.0f;
          }
          store_row<T, VEC>(dx + base, c, C, out);
        }
      } else {
        store_row<T, VEC>(dx + base, c, C, gh);
      }
    }
  }
  // This block's partial weight gradients: its own row of the (programs, C) buffers.
  const int64_t part = int64_t(blockIdx.x) * C;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC + j;
      if (c < C) {
        gstore(dw_part + part + c, dw[(i * VEC + j) * blockDim.x + threadIdx.x]);
        if (x_scale != nullptr) gstore(ds_part + part + c, ds[(i * VEC + j) * blockDim.x + threadIdx.x]);
      }
    }
}

// out[c] = sum_p part[p, c], rounded once to the output dtype. One thread per column: reads are
// coalesced across the warp, the sum order is fixed (deterministic).
template <class T>
__global__ void __launch_bounds__(256) column_sum_kernel(const float* __restrict__ part, T* __restrict__ out,
                                                         int64_t programs, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int64_t p = 0; p < programs; ++p) acc += gload(part + p * C + c);
  gstore(out + c, from_f32<T>(acc));
}

// Threads per block and vectors per thread for a row of C elements in vectors of VEC: the fewest
// vectors per thread that keep the block at <= 256 threads. Rows up to 12288 elements vectorised
// (the widest real row, the 5B FFN's 9728, included), 4096 scalar (C not a multiple of the vector).

struct RowShape {
  int threads, nv;
};

inline RowShape row_shape(int64_t C, int vec) {
  const int64_t vectors = (C + vec - 1) / vec;
  RowShape best{0, 0};
  for (int nv = 1; nv * vec <= max_elems_per_thread(vec); nv *= 2) {
    const int64_t threads = ((vectors + nv - 1) / nv + 31) / 32 * 32;
    if (threads > max_threads_for(nv * vec)) continue;
    best = {int(threads), nv};
    if (threads <= 256) break;
  }
  return best;
}

inline int64_t max_width(int vec) { return int64_t(max_elems_per_thread(vec)) * max_threads_for(max_elems_per_thread(vec)); }

template <class T, int VEC, class Launch>
int with_row_shape(int64_t C, Launch&& launch) {
  const RowShape s = row_shape(C, VEC);
  if (s.threads == 0) return kBadShape;
  auto pick = [&](auto nv_c) {
    if constexpr (decltype(nv_c)::value * VEC <= max_elems_per_thread(VEC)) launch(nv_c, s.threads);
  };
  switch (s.nv) {
    case 1: pick(std::integral_constant<int, 1>{}); break;
    case 2: pick(std::integral_constant<int, 2>{}); break;
    case 4: pick(std::integral_constant<int, 4>{}); break;
    case 8: pick(std::integral_constant<int, 8>{}); break;
    default: pick(std::integral_constant<int, 16>{}); break;
  }
  return kOk;
}

inline bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

template <class T>
int fwd(const void* x, const void* residual, const void* x_scale, const void* w, int param_dtype, void* y, void* h,
        float* rstd, int64_t rows, int64_t C, float eps, int programs, void* stream) {
  const bool vec = C % vec_width<T>() == 0 && all_aligned({x, residual, y, h});
  auto go = [&](auto vec_c) -> int {
    constexpr int VEC = decltype(vec_c)::value;
    return with_row_shape<T, VEC>(C, [&](auto nv_c, int threads) {
      constexpr int NV = decltype(nv_c)::value;
      S2_LAUNCH((rms_norm_fwd_kernel<T, NV, VEC>), dim3(programs), dim3(threads), 0, stream,
                static_cast<const T*>(x), static_cast<const T*>(residual), x_scale, w, param_dtype,
                static_cast<T*>(y), static_cast<T*>(h), rstd, rows, C, eps);
    });
  };
  const int st = vec ? go(std::integral_constant<int, vec_width<T>()>{}) : go(std::integral_constant<int, 1>{});
  return st != kOk ? st : S2_LAUNCH_STATUS();
}

template <class T>
int bwd(const void* dy, const void* dh, const void* x, const void* h, const void* x_scale, const void* w,
        int param_dtype, const float* rstd, void* dx, void* dres, float* dw_part, float* ds_part, int64_t rows,
        int64_t C, int programs, void* stream) {
  const bool vec = C % vec_width<T>() == 0 && all_aligned({dy, dh, x, h, dx, dres});
  auto go = [&](auto vec_c) -> int {
    constexpr int VEC = decltype(vec_c)::value;
    return with_row_shape<T, VEC>(C, [&](auto nv_c, int threads) {
      constexpr int NV = decltype(nv_c)::value;
      const size_t smem = size_t(x_scale != nullptr ? 2 : 1) * NV * VEC * threads * sizeof(float);
      S2_SET_MAX_DYNAMIC_SMEM((rms_norm_bwd_kernel<T, NV, VEC>), smem);
      S2_LAUNCH((rms_norm_bwd_kernel<T, NV, VEC>), dim3(programs), dim3(threads), smem, stream,
                static_cast<const T*>(dy), static_cast<const T*>(dh), static_cast<const T*>(x),
                static_cast<const T*>(h), x_scale, w, param_dtype, rstd, static_cast<T*>(dx),
                static_cast<T*>(dres), dw_part, ds_part, rows, C);
    });
  };
  const int st = vec ? go(std::integral_constant<int, vec_width<T>()>{}) : go(std::integral_constant<int, 1>{});
  return st != kOk ? st : S2_LAUNCH_STATUS();
}

}  // namespace
}  // namespace s2

extern "C" {

// Widest row the kernels take for this dtype and width alignment (vectorised when cols is a multiple
// of 16 bytes' worth of elements and the pointers are 16-byte aligned).
int64_t s2_rms_norm_max_width(int dtype, int vectorised) {
  const int vec = !vectorised ? 1 : (dtype == s2::kFloat32 ? 4 : 8);
  return s2::max_width(vec);
}

int s2_rms_norm_fwd(int dtype, int param_dtype, const void* x, const void* residual, const void* x_scale,
                    const void* w, void* y, void* h, float* rstd, int64_t rows, int64_t cols, float eps, int programs,
                    void* stream) {
  if (rows <= 0) return s2::kOk;
  if (programs <= 0 || cols <= 0 || (residual != nullptr) != (h != nullptr)) return s2::kBadShape;
  if (programs > rows) programs = int(rows);
  S2_DISPATCH_DTYPE(dtype, T, return s2::fwd<T>(x, residual, x_scale, w, param_dtype, y, h, rstd, rows, cols, eps,
                                                programs, stream));
  return s2::kBadDType;
}

int s2_rms_norm_bwd(int dtype, int param_dtype, const void* dy, const void* dh, const void* x, const void* h,
                    const void* x_scale, const void* w, const float* rstd, void* dx, void* dres, float* dw_part,
                    float* ds_part, int64_t rows, int64_t cols, int programs, void* stream) {
  // No early return for rows == 0: every block still writes its (zero) partial rows.
  if (rows < 0 || programs <= 0 || cols <= 0 || (x_scale != nullptr && (dres == nullptr || ds_part == nullptr)))
    return s2::kBadShape;
  S2_DISPATCH_DTYPE(dtype, T, return s2::bwd<T>(dy, dh, x, h, x_scale, w, param_dtype, rstd, dx, dres, dw_part,
                                                ds_part, rows, cols, programs, stream));
  return s2::kBadDType;
}

int s2_column_sum(int out_dtype, const float* part, void* out, int64_t programs, int64_t cols, void* stream) {
  if (cols <= 0) return s2::kOk;
  const dim3 grid(unsigned((cols + 255) / 256));
  S2_DISPATCH_DTYPE(out_dtype, T, S2_LAUNCH((s2::column_sum_kernel<T>), grid, dim3(256), 0, stream, part,
                                            static_cast<T*>(out), programs, cols));
  return S2_LAUNCH_STATUS();
}

}  // extern "C"
