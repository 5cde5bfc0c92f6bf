// Deliberately racy kernel for the emulator's race checks (tests/cuda/test_emulator.py), not part of
// the extension: a tree reduction in shared memory whose barriers can be left out.
//
//   with_barrier = 1: correct (a __syncthreads after the stores and after every tree level);
//   with_barrier = 0: the classic bug - threads read partial sums other threads have not written
//                     yet. The host-thread build under ThreadSanitizer reports it as a data race
//                     (emu.load(threads=True, sanitize=True, ...)); the fiber build gives a result
//                     that depends on the schedule (forward vs reverse order).
//
// Compiled only by the emulation (a .cu so that CMake's csrc/tests/*.cpp CTest glob skips it).
#include "kernels/c_api.h"
#include "kernels/device_common.cuh"

namespace {

__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int with_barrier) {
  __shared__ float partial[1024];
  const unsigned t = threadIdx.x;
  partial[t] = s2::gload(x + size_t(blockIdx.x) * blockDim.x + t);
  if (with_barrier) __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) partial[t] += partial[t + s];
    if (with_barrier) __syncthreads();
  }
  if (t == 0) s2::gstore(out + blockIdx.x, partial[0]);
}

}  // namespace

extern "C" {

// out[b] = sum(x[b * threads : (b + 1) * threads]); threads a power of 2 from 32 to 1024.
S2_API int s2test_block_sum(const float* x, float* out, int64_t blocks, int threads, int with_barrier) {
  if (blocks <= 0 || threads < 32 || threads > 1024 || (threads & (threads - 1)) != 0) return s2::kBadShape;
  S2_LAUNCH(block_sum_kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)), 0, nullptr, x, out, with_barrier);
  return S2_LAUNCH_STATUS();
}

}  // extern "C"
