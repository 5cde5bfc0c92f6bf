// C API of the SwiGLU kernels (swiglu.cu). Torch-free: called by the torch bindings (csrc/bindings)
// with a CUDA stream and by the CPU emulation tests through ctypes (stream NULL).
//
// dtype: s2::DType (0 fp32, 1 fp16, 2 bf16). x12 is (rows, 2F) contiguous, a = x12[:, :F] and
// b = x12[:, F:]; y, dy, s and ds are (rows, F), dx12 is (rows, 2F). db_part is an fp32
// (programs, 2F) buffer of per-block partial column sums of dx12, reduced by s2_column_sum
// (rms_norm.h), or NULL when no bias gradient is wanted. Returns 0 or an s2::Status code.
#pragma once
#include "c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

// y = silu(a) * b
S2_API int s2_swiglu_fwd(int dtype, const void* x12, void* y, int64_t rows, int64_t F, void* stream);

// dx12 = [dy * b * s * (1 + a * (1 - s)), dy * a * s] with s = sigmoid(a)
S2_API int s2_swiglu_bwd(int dtype, const void* dy, const void* x12, void* dx12, int64_t rows, int64_t F,
                         void* stream);

// One pass over x12 in the FFN backward: s = silu(a) * b, dx12 as s2_swiglu_bwd (from ds), and, when
// db_part is not NULL, db_part[p] = sum over the rows of block row p of dx12 as stored (rounded to
// dtype). `programs` blocks share the rows (row = p, p + programs, ...); every block writes its
// partial row even when rows == 0. s may be NULL: then it is not written (dx12 and the bias
// partials only, for a caller that kept the hidden activation).
S2_API int s2_swiglu_recompute_bwd(int dtype, const void* ds, const void* x12, void* s, void* dx12, float* db_part,
                                   int64_t rows, int64_t F, int programs, void* stream);

// Column tiles (blocks along a row) the kernels split a row of F outputs into, for aligned pointers;
// the bindings size db_part's programs from it so that tiles x programs blocks fill the GPU.
S2_API int64_t s2_swiglu_column_tiles(int dtype, int64_t F);

#ifdef __cplusplus
}
#endif
