// Shared by the torch bindings: argument checks with clear messages, dtype codes, the stream.
//
// The same binding sources build two ways:
//   * the extension sapiens2._C (setup.py, nvcc + CUDA torch): ops `sapiens2_cuda::*` on the CUDA
//     dispatch key, launched on the current CUDA stream;
//   * with -DSAPIENS2_EMU (sapiens2/cuda_tools/emu_ext.py, host compiler + CPU torch): ops
//     `sapiens2_emu::*` on the CPU dispatch key, the kernels run by the CPU emulation — so tests
//     run the whole path (op -> binding -> kernel) without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

// Host code only: the C API's codes, never the device-side kernel header (it needs nvcc or the
// emulator). The emulation build also needs the emulator's last-error message.
#include "kernels/c_api.h"
#ifdef SAPIENS2_EMU
#include "emu/cuda_emu.h"
#endif

#ifdef SAPIENS2_EMU
#define S2_NS sapiens2_emu
#define S2_DEVICE_KEY CPU
#define S2_DEVICE_NAME "CPU (emulation)"
#else
// c10's stream and guard only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#define S2_NS sapiens2_cuda
#define S2_DEVICE_KEY CUDA
#define S2_DEVICE_NAME "CUDA"
#endif

// TORCH_LIBRARY* paste their namespace argument, so expand S2_NS / S2_DEVICE_KEY first.
#define S2_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define S2_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
// Declare this file's op schemas.
#define S2_FRAGMENT(m) S2_FRAGMENT_(S2_NS, m)
// Register this file's kernels, given as `static void register_impls(torch::Library& m)`:
// for the kernel device and, in the CUDA build, for CPU too, where the bindings' first check
// refuses CPU tensors with a clear message instead of torch's "could not run ... CPU backend".
#ifdef SAPIENS2_EMU
#define S2_REGISTER_IMPLS(fn) \
  S2_IMPL_(S2_NS, S2_DEVICE_KEY, m) { fn(m); }
#else
#define S2_REGISTER_IMPLS(fn)                \
  S2_IMPL_(S2_NS, S2_DEVICE_KEY, m) { fn(m); } \
  S2_IMPL_(S2_NS, CPU, m) { fn(m); }
#endif

namespace s2b {

inline bool on_kernel_device(const at::Tensor& t) {
#ifdef SAPIENS2_EMU
  return t.device().is_cpu();
#else
  return t.device().is_cuda();
#endif
}

inline void check_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(on_kernel_device(t), op, ": ", name, " must be a ", S2_DEVICE_NAME, " tensor, got one on ",
                    t.device(), " (the sapiens2 CUDA kernels run on GPU tensors only)");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

inline void check_optional(const c10::optional<at::Tensor>& t, const char* op, const char* name) {
  if (t.has_value()) check_tensor(*t, op, name);
}

inline int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return s2::kFloat32;
    case at::kHalf: return s2::kFloat16;
    case at::kBFloat16: return s2::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", bn, " has dtype ", b.scalar_type(), " but ", an,
                   " has ", a.scalar_type(), "; they must match");
}

inline const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

inline void* stream() {
#ifdef SAPIENS2_EMU
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

// Persistent-grid size for row-wise kernels: a few blocks per SM (the emulation uses a small grid so
// that several rows share a block, as on the GPU).
inline int row_programs(int64_t rows, int per_sm = 4) {
#ifdef SAPIENS2_EMU
  const int64_t sms = 3;
#else
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  const int64_t sms = count;
#endif
  return int(std::max<int64_t>(1, std::min<int64_t>(rows, sms * per_sm)));
}

inline void check_status(int status, const char* op) {
  TORCH_CHECK(status == s2::kOk, op, ": kernel launch failed with status ", status,
              status == s2::kBadShape ? " (shape outside what the kernel supports)" : "",
#ifdef SAPIENS2_EMU
              ": ", emu::last_error()
#else
              ""
#endif
  );
#ifdef SAPIENS2_EMU
  emu::last_error().clear();
#endif
}

// Make the tensors' device current for the launch (multi-GPU).
#ifdef SAPIENS2_EMU
#define S2_DEVICE_GUARD(t) ((void)0)
#else
#define S2_DEVICE_GUARD(t) const c10::cuda::CUDAGuard s2_device_guard((t).device())
#endif

}  // namespace s2b
