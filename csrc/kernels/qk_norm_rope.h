// C API of the per-head QK-RMSNorm + 2D RoPE kernels (qk_norm_rope.cu). Torch-free: called by the
// torch bindings (csrc/bindings) with a CUDA stream and by the CPU emulation tests through ctypes
// (stream NULL).
//
// dtype: s2::DType of q and k (and of every other activation); param_dtype: the DType of q_weight
// and k_weight (T or fp32). q is (batch, tokens, q_heads, head_dim) and k (batch, tokens, k_heads,
// head_dim), contiguous; the rstd are fp32 (batch, tokens, heads). sin / cos are fp32 tables of
// the rotated tokens n >= prefix: (tokens - prefix, head_dim) shared by the samples, or
// (batch, tokens - prefix, head_dim) per sample (per_sample_tables); NULL for the norm only.
// The grid is `programs` blocks along the token positions times `sample_splits` blocks along the
// samples; the weight-gradient partials are fp32 (sample_splits * programs, head_dim) buffers (row
// split * programs + program), reduced by s2_column_sum (rms_norm.h). Returns 0 or an s2::Status.
#pragma once
#include "c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

// 1 when the kernels take this head dimension (a multiple of 4 from 4 to 512), else 0.
S2_API int s2_qk_norm_rope_supports_head_dim(int64_t head_dim);

S2_API int s2_qk_norm_rope_fwd(int dtype, int param_dtype, const void* q, const void* k, const void* q_weight,
                               const void* k_weight, const float* sin, const float* cos, void* q_out, void* k_out,
                               float* q_rstd, float* k_rstd, int64_t batch, int64_t tokens, int64_t q_heads,
                               int64_t k_heads, int64_t head_dim, int64_t prefix, int per_sample_tables, float eps,
                               int programs, int sample_splits, void* stream);

// dq / dk are the gradients of q_out / k_out; dq_in / dk_in those of q / k. Every block writes its
// partial rows, also when there are no tokens.
S2_API int s2_qk_norm_rope_bwd(int dtype, int param_dtype, const void* dq, const void* dk, const void* q,
                               const void* k, const void* q_weight, const void* k_weight, const float* sin,
                               const float* cos, const float* q_rstd, const float* k_rstd, void* dq_in, void* dk_in,
                               float* dq_weight_part, float* dk_weight_part, int64_t batch, int64_t tokens,
                               int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t prefix,
                               int per_sample_tables, int programs, int sample_splits, void* stream);

#ifdef __cplusplus
}
#endif
