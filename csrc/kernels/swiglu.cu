// SwiGLU on the fused w12 projection output, forward, backward and the FFN backward pass that
// recomputes the hidden activation (SIMT, memory-bound elementwise).
//
// Semantics are those of sapiens2.ops.swiglu (see sapiens2/ops/swiglu.py), all math in fp32:
//   forward    a, b = x12[:, :F], x12[:, F:];   y = a * sigmoid(a) * b
//   backward   sg = sigmoid(a)   (recomputed from x12: nothing but x12 is kept for backward)
//              d/da (a * sg) = sg + a * sg * (1 - sg) = sg * (1 + a * (1 - sg)), hence
//              da = dy * b * sg * (1 + a * (1 - sg)),   db = dy * a * sg
//   recompute  the same pass also re-emits s = y (for the w3 weight gradient) and the w12 bias
//              gradient db12 = sum_rows(dx12), summed from dx12 as it is stored (rounded to T), as
//              the reference sums the stored tensor;
//   bias       the recompute pass without s (a caller that kept the hidden activation): dx12 and
//              the bias gradient's partial rows only.
//
// Layout: grid.x tiles a row's F output columns (one vector of VEC columns per thread: 128-bit
// accesses when F is a multiple of 16 bytes of elements and the pointers are aligned, else single
// elements), grid.y walks the rows (row = blockIdx.y, + gridDim.y, ...). A thread owns its columns
// for the whole launch, so a, b and the incoming gradient are read exactly once and every output
// written once; for the bias gradient it keeps fp32 running sums of its columns over the block's
// rows and writes them once as the block's partial row (programs x 2F, no atomics), which
// s2_column_sum reduces in a fixed order (deterministic).
#include "device_common.cuh"
#include "swiglu.h"

#include <algorithm>
#include <initializer_list>
#include <type_traits>

namespace s2 {
namespace swiglu_kernels {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGridY = 65535;

enum Pass : int { kForward = 0, kBackward = 1, kRecompute = 2, kBias = 3 };

// VEC fp32 partial sums: 128-bit stores when VEC is a multiple of 4 (the partial rows are then
// 16-byte aligned: 2F and the column are multiples of VEC).
template <int VEC>
__device__ __forceinline__ void store_partial(float* p, const float* in) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      Vec<float, 4> v;
#pragma unroll
      for (int j = 0; j < 4; ++j) v.v[j] = in[k + j];
      gstore_vec<float, 4>(p + k, v);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) gstore(p + j, in[j]);
  }
}

// The hardware exp (what the extension's --use_fast_math makes of expf anyway; a few ulp, and
// where it is least exact, large |a|, the output is either tiny or sigmoid is 1 to within an ulp)
// and a correctly rounded reciprocal, which fast-math leaves exact.
__device__ __forceinline__ float sigmoid(float a) { return __frcp_rn(1.0f + __expf(-a)); }

// x12 (rows, 2F); `grad` is dy (backward) or ds (recompute, bias), (rows, F); `y` is y (forward) or s
// (recompute), (rows, F), unused by the other passes; dx12 (rows, 2F); db_part (gridDim.y, 2F) or
// NULL (recompute), (gridDim.y, 2F) (bias).
template <class T, int VEC, int PASS>
__global__ void __launch_bounds__(kMaxThreads) swiglu_kernel(const T* __restrict__ x12, const T* __restrict__ grad,
                                                             T* __restrict__ y, T* __restrict__ dx12,
                                                             float* __restrict__ db_part, int64_t rows, int64_t F) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= F) return;  // VEC divides F on the vectorised path: a vector is all in or all out
  float sum_da[VEC], sum_db[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum_da[j] = sum_db[j] = 0.0f;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* row = x12 + r * 2 * F;
    float a[VEC], b[VEC];
    load_f32<T, VEC>(row + c, a);
    load_f32<T, VEC>(row + F + c, b);
    float sg[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sg[j] = sigmoid(a[j]);
    if constexpr (PASS == kForward || PASS == kRecompute) {
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = a[j] * sg[j] * b[j];
      store_f32<T, VEC>(y + r * F + c, out);
    }
    if constexpr (PASS != kForward) {
      float g[VEC], da[VEC], db[VEC];
      load_f32<T, VEC>(grad + r * F + c, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        da[j] = round_to<T>(g[j] * b[j] * sg[j] * (1.0f + a[j] * (1.0f - sg[j])));
        db[j] = round_to<T>(g[j] * a[j] * sg[j]);
        sum_da[j] += da[j];
        sum_db[j] += db[j];
      }
      T* drow = dx12 + r * 2 * F;
      store_f32<T, VEC>(drow + c, da);
      store_f32<T, VEC>(drow + F + c, db);
    }
  }
  if constexpr (PASS == kRecompute || PASS == kBias) {
    if (db_part != nullptr) {
      float* part = db_part + int64_t(blockIdx.y) * 2 * F;
      store_partial<VEC>(part + c, sum_da);
      store_partial<VEC>(part + F + c, sum_db);
    }
  }
}

struct Tiling {
  int threads;
  int64_t tiles;
};

inline Tiling tiling(int64_t F, int vec) {
  const int64_t vectors = (F + vec - 1) / vec;
  const int64_t threads = std::min<int64_t>(kMaxThreads, (vectors + 31) / 32 * 32);
  return {int(threads), (vectors + threads - 1) / threads};
}

inline bool aligned_all(const void* a, const void* b, const void* c, const void* d, const void* e) {
  for (const void* p : {a, b, c, d, e})
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

template <class T, int PASS>
int launch(const void* x12, const void* grad, void* y, void* dx12, float* db_part, int64_t rows, int64_t F,
           int64_t grid_rows, void* stream) {
  const bool vec = F % vec_width<T>() == 0 && aligned_all(x12, grad, y, dx12, db_part);
  auto go = [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    const Tiling t = tiling(F, VEC);
    S2_LAUNCH((swiglu_kernel<T, VEC, PASS>), dim3(unsigned(t.tiles), unsigned(grid_rows)), dim3(t.threads), 0,
              stream, static_cast<const T*>(x12), static_cast<const T*>(grad), static_cast<T*>(y),
              static_cast<T*>(dx12), db_part, rows, F);
  };
  if (vec)
    go(std::integral_constant<int, vec_width<T>()>{});
  else
    go(std::integral_constant<int, 1>{});
  return S2_LAUNCH_STATUS();
}

inline int64_t rows_grid(int64_t rows) { return std::min(rows, kMaxGridY); }

}  // namespace swiglu_kernels
}  // namespace s2

extern "C" {

int64_t s2_swiglu_column_tiles(int dtype, int64_t F) {
  const int width = dtype == s2::kFloat32 ? 4 : 8;
  const int vec = F % width == 0 ? width : 1;
  return F <= 0 ? 0 : s2::swiglu_kernels::tiling(F, vec).tiles;
}

int s2_swiglu_fwd(int dtype, const void* x12, void* y, int64_t rows, int64_t F, void* stream) {
  namespace k = s2::swiglu_kernels;
  if (rows < 0 || F < 0) return s2::kBadShape;
  if (rows == 0 || F == 0) return s2::kOk;
  S2_DISPATCH_DTYPE(dtype, T,
                    return k::launch<T, k::kForward>(x12, nullptr, y, nullptr, nullptr, rows, F, k::rows_grid(rows),
                                                     stream));
  return s2::kBadDType;
}

int s2_swiglu_bwd(int dtype, const void* dy, const void* x12, void* dx12, int64_t rows, int64_t F, void* stream) {
  namespace k = s2::swiglu_kernels;
  if (rows < 0 || F < 0) return s2::kBadShape;
  if (rows == 0 || F == 0) return s2::kOk;
  S2_DISPATCH_DTYPE(dtype, T,
                    return k::launch<T, k::kBackward>(x12, dy, nullptr, dx12, nullptr, rows, F, k::rows_grid(rows),
                                                      stream));
  return s2::kBadDType;
}

int s2_swiglu_recompute_bwd(int dtype, const void* ds, const void* x12, void* s, void* dx12, float* db_part,
                            int64_t rows, int64_t F, int programs, void* stream) {
  namespace k = s2::swiglu_kernels;
  if (rows < 0 || F < 0 || (db_part != nullptr && (programs <= 0 || programs > k::kMaxGridY))) return s2::kBadShape;
  if (F == 0 || (rows == 0 && db_part == nullptr)) return s2::kOk;
  // With partial rows every one of the `programs` blocks rows writes its row, even for rows == 0.
  const int64_t grid_rows = db_part != nullptr ? programs : k::rows_grid(rows);
  if (s != nullptr) {
    S2_DISPATCH_DTYPE(dtype, T,
                      return k::launch<T, k::kRecompute>(x12, ds, s, dx12, db_part, rows, F, grid_rows, stream));
  } else if (db_part != nullptr) {
    S2_DISPATCH_DTYPE(dtype, T,
                      return k::launch<T, k::kBias>(x12, ds, nullptr, dx12, db_part, rows, F, grid_rows, stream));
  } else {
    S2_DISPATCH_DTYPE(dtype, T,
                      return k::launch<T, k::kBackward>(x12, ds, nullptr, dx12, nullptr, rows, F, grid_rows, stream));
  }
  return s2::kBadDType;
}

}  // extern "C"
