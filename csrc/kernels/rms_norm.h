// C API of the RMSNorm kernels (rms_norm.cu). Torch-free: called by the torch bindings
// (csrc/bindings) with a CUDA stream and by the CPU emulation tests through ctypes (stream NULL).
//
// dtype / param_dtype: s2::DType (0 fp32, 1 fp16, 2 bf16). Rows are contiguous with `cols`
// elements. Optional pointers are NULL when absent: residual and h together (add_rms_norm),
// x_scale (LayerScale), dh (the stream's incoming gradient). dw_part / ds_part are fp32
// (programs, cols) buffers reduced by s2_column_sum. Returns 0 or an s2::Status code.
#pragma once
#include "c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

// Widest row the kernels take (vectorised: cols a multiple of 16 bytes of elements, 16-byte
// aligned pointers); wider rows return s2::kBadShape.
S2_API int64_t s2_rms_norm_max_width(int dtype, int vectorised);

S2_API int s2_rms_norm_fwd(int dtype, int param_dtype, const void* x, const void* residual, const void* x_scale,
                    const void* w, void* y, void* h, float* rstd, int64_t rows, int64_t cols, float eps, int programs,
                    void* stream);

S2_API int s2_rms_norm_bwd(int dtype, int param_dtype, const void* dy, const void* dh, const void* x, const void* h,
                    const void* x_scale, const void* w, const float* rstd, void* dx, void* dres, float* dw_part,
                    float* ds_part, int64_t rows, int64_t cols, int programs, void* stream);

// out[c] = sum_p part[p, c] (fp32 partial rows -> out_dtype), in a fixed order.
S2_API int s2_column_sum(int out_dtype, const float* part, void* out, int64_t programs, int64_t cols, void* stream);

#ifdef __cplusplus
}
#endif
