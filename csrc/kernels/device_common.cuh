// What every kernel in csrc/kernels shares, for both builds of the same source:
//   * nvcc (the extension, the sm_80 / sm_90a compile gate), and
//   * the CPU emulation (g++ -DSAPIENS2_EMU, csrc/emu/cuda_emu.h), which runs the kernels in tests.
// Torch-free on purpose: the kernels compile in seconds and the torch bindings stay thin.
//
// Conventions:
//   * all global memory is read with gload / gload_vec and written with gstore / gstore_vec (the
//     emulator counts those bytes; on the GPU they are plain (vectorised) loads and stores);
//   * arithmetic is fp32 whatever the storage dtype (to_f32 / from_f32 round to nearest even);
//   * launchers return an int status (0 = ok) and never throw; argument checking happens in the
//     bindings and the Python ops, which name the argument.
#pragma once

#ifdef SAPIENS2_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "c_api.h"  // s2::DType, s2::Status

namespace s2 {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Round an fp32 value to T and back: reproduces the rounding of an intermediate that PyTorch
// stores in T (e.g. the residual stream h) without a store.
template <class T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// ---- global memory ----------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ T gload(const T* p) {
#ifdef SAPIENS2_EMU
  emu::count(p, sizeof(T), false);
#endif
  return *p;
}

template <class T>
__device__ __forceinline__ void gstore(T* p, T v) {
#ifdef SAPIENS2_EMU
  emu::count(p, sizeof(T), true);
#endif
  *p = v;
}

// N consecutive elements as one aligned access (128 bits when N * sizeof(T) == 16).
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ Vec<T, N> gload_vec(const T* p) {
#ifdef SAPIENS2_EMU
  emu::count(p, sizeof(T) * N, false);
#endif
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <class T, int N>
__device__ __forceinline__ void gstore_vec(T* p, const Vec<T, N>& v) {
#ifdef SAPIENS2_EMU
  emu::count(p, sizeof(T) * N, true);
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// VEC consecutive elements of T as fp32 (one 128-bit access when VEC * sizeof(T) == 16).
template <class T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float* out) {
  if constexpr (VEC == 1) {
    out[0] = to_f32(gload(p));
  } else {
    const Vec<T, VEC> v = gload_vec<T, VEC>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f32(v.v[j]);
  }
}

template <class T, int VEC>
__device__ __forceinline__ void store_f32(T* p, const float* in) {
  if constexpr (VEC == 1) {
    gstore(p, from_f32<T>(in[0]));
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_f32<T>(in[j]);
    gstore_vec<T, VEC>(p, v);
  }
}

// Element i of a parameter vector stored in any DType (mixed precision keeps fp32 masters beside
// bf16 activations): a runtime switch, uniform across the block.
__device__ __forceinline__ float load_param_f32(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32:
      return gload(static_cast<const float*>(p) + i);
    case kFloat16:
      return to_f32(gload(static_cast<const __half*>(p) + i));
    default:
      return to_f32(gload(static_cast<const __nv_bfloat16*>(p) + i));
  }
}

// Elements per 128-bit access.
template <class T>
constexpr int vec_width() { return 16 / int(sizeof(T)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- reductions -------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` is __shared__ float[32] owned by the caller; the leading barrier makes it safe
// to call twice in a row.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(total);
}

// Dynamic shared memory: `type* name` pointing at the block's dynamic allocation.
#ifdef SAPIENS2_EMU
#define S2_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::emu::dynamic_smem())
#define S2_SET_MAX_DYNAMIC_SMEM(kernel, bytes) ((void)0)
#else
#define S2_DYNAMIC_SMEM(type, name)                      \
  extern __shared__ __align__(16) unsigned char s2_dynamic_smem_raw[]; \
  type* name = reinterpret_cast<type*>(s2_dynamic_smem_raw)
// Above 48 KiB a kernel must opt in to its dynamic shared memory. The opt-in is set to the device's
// maximum, not to this launch's size: one value for every caller, so host threads launching the
// same kernel with different sizes cannot undo each other's setting between set and launch.
template <class Kernel>
inline void s2_opt_in_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0, most = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return;  // the launch then reports the error
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most);
}
#define S2_SET_MAX_DYNAMIC_SMEM(kernel, bytes) s2_opt_in_dynamic_smem(kernel, bytes)
#endif

#ifdef SAPIENS2_EMU
#define S2_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch_named(#kernel, kernel, grid, block, smem, __VA_ARGS__)
#define S2_LAUNCH_STATUS() ::emu::take_status()
#else
#define S2_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define S2_LAUNCH_STATUS() (cudaGetLastError() == cudaSuccess ? ::s2::kOk : ::s2::kLaunchFailed)
#endif

// Dispatch a launcher template over the storage dtype.
#define S2_DISPATCH_DTYPE(dtype, T, ...)          \
  switch (dtype) {                                \
    case ::s2::kFloat32: {                        \
      using T = float;                            \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case ::s2::kFloat16: {                        \
      using T = __half;                           \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case ::s2::kBFloat16: {                       \
      using T = __nv_bfloat16;                    \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    default:                                      \
      return ::s2::kBadDType;                     \
  }

}  // namespace s2
