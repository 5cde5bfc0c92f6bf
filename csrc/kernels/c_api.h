// Conventions of the kernels' C API (one header per kernel family declares its launchers):
//   * extern "C", torch-free; tensors are raw pointers, sizes int64_t, dtypes s2::DType codes
//     (0 fp32, 1 fp16, 2 bf16), absent optional tensors NULL, `stream` a cudaStream_t (NULL in the
//     CPU emulation);
//   * every launcher returns 0 or an s2::Status code and never throws;
//   * S2_API marks them exported: the libraries are built with hidden visibility so that two
//     emulation builds loaded in one process never share the emulator's internal state.
#pragma once
#include <stdint.h>

#if defined(__GNUC__)
#define S2_API __attribute__((visibility("default")))
#else
#define S2_API
#endif

#ifdef __cplusplus
namespace s2 {

// Storage dtypes, numbered as the bindings and the emulation C API pass them.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Status : int {
  kOk = 0,
  kBadDType = 1,
  kBadShape = 2,
  kBadAlignment = 3,
  kLaunchFailed = 4,
};

}  // namespace s2
#endif
