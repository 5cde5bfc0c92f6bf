// C API of the window-attention and CLS-pooling kernels (window_attention.cu): the 4K tokenizer's
// attention inside non-overlapping w x w windows (plus an optional per-window prefix, the CLS
// token) and its last layer's CLS-only pooling, forward and backward. Torch-free: called by the
// torch bindings (csrc/bindings/window_attention.cpp) with a CUDA stream and by the CPU emulation
// tests through ctypes (stream NULL). Semantics: sapiens2/ops/window_attention.py.
//
// Tensors (dtype: s2::DType, 0 fp32, 1 fp16, 2 bf16; all of one dtype except mask and lse):
//   * token tensors q, k, v, dout, o   (B, L, heads, D)   in the "grid" layout (L = grid_h *
//     grid_w tokens, row-major; window (i, j) holds rows i*w .. i*w+w-1 and columns j*w ..
//     j*w+w-1) or the "windows" layout (L = K*w*w: K gathered windows one after another);
//   * prefix tensors pq, pk, pv, dpo, po and the CLS tensors cq, ck, cv   (B, nW, heads, D): one
//     row per window (nW = (grid_h/w)*(grid_w/w) in the grid layout, K in the windows layout).
//   Every such input is given as (pointer, batch stride, row stride), strides in elements: heads
//   and D must be contiguous inside a row (stride(-1) == 1, stride(-2) == D) but the rows and
//   batches may be strided, e.g. q, k, v as views of one fused (B, L, 3*heads*D) projection
//   output, read without a copy. The backward's gradient outputs are given the same way (heads
//   and D contiguous, rows and batches strided, no two rows overlapping), e.g. dq, dk, dv as the
//   slots of one packed (B, L, 3, heads, D) dqkv, written in place. The forwards' outputs are
//   contiguous: token outputs (B, L, heads, D), prefix / CLS outputs (B, nW, heads, D), lse fp32
//   (B*nW, heads, P + w*w) for window attention (P = 1 with a prefix, row 0 the prefix query) and
//   (B*nW, heads, 1) for cls_pool, natural-log log-sum-exp of the scaled scores (0 for a query
//   without any valid key). All outputs are allocated by the caller.
//   token_mask: (B, L) bool bytes (1 = attend), grid layout only, NULL for none; masks keys, never
//   the prefix key. Absent optional tensors are NULL (their strides are ignored).
//
// layout: 0 grid, 1 windows. Head dims: a multiple of 4 from 4 to 256; windows with
// P + w*w <= 65 rows (w <= 8); each launch's shared memory must fit the device (see
// s2_window_attention_smem_bytes). Returns 0 or an s2::Status code (kBadShape outside that range).
#pragma once
#include "c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

// Kernel ids for s2_window_attention_smem_bytes.
#define S2_WA_KERNEL_FWD 0
#define S2_WA_KERNEL_BWD 1
#define S2_WA_KERNEL_CLS_FWD 2
#define S2_WA_KERNEL_CLS_BWD 3

// Dynamic shared memory (bytes) of the smallest block (one window-head) of `kernel` for this window
// and head dim, or -1 when head_dim / window are outside the kernels' range (cls_pool always has
// its CLS key: has_prefix is ignored there). A launch fails with kBadShape when this exceeds
// s2_window_attention_smem_limit().
S2_API int64_t s2_window_attention_smem_bytes(int kernel, int64_t window, int has_prefix, int64_t head_dim);

// The current device's opt-in shared memory per block (227 KiB on sm_90, 163 KiB on sm_80).
S2_API int64_t s2_window_attention_smem_limit(void);

S2_API int s2_window_attention_fwd(int dtype,
                                   const void* q, int64_t q_sb, int64_t q_st,
                                   const void* k, int64_t k_sb, int64_t k_st,
                                   const void* v, int64_t v_sb, int64_t v_st,
                                   const void* pq, int64_t pq_sb, int64_t pq_st,
                                   const void* pk, int64_t pk_sb, int64_t pk_st,
                                   const void* pv, int64_t pv_sb, int64_t pv_st,
                                   const uint8_t* token_mask,
                                   void* o, void* po, float* lse,
                                   int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                                   int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale,
                                   void* stream);

// dpo (the prefix output's gradient) may be NULL with a prefix (then treated as zeros and po is
// not read); o / po are the forward's outputs, lse its saved statistics. Outputs dpq, dpk, dpv
// only with a prefix. bias_partials: NULL, or a contiguous fp32 (B*nW, 3, heads, D) buffer that
// receives, per window and head, the column sums of the gradients as stored (rounded to the
// dtype) over the window's w*w tokens and its prefix row: [:, 0] of dq (+ dpq), [:, 1] of dk
// (+ dpk), [:, 2] of dv (+ dpv); summed over the windows they are a q/k/v bias's gradient. Each
// partial is written once by the block that computed the window (deterministic, no atomics).
S2_API int s2_window_attention_bwd(int dtype,
                                   const void* dout, int64_t dout_sb, int64_t dout_st,
                                   const void* dpo, int64_t dpo_sb, int64_t dpo_st,
                                   const void* q, int64_t q_sb, int64_t q_st,
                                   const void* k, int64_t k_sb, int64_t k_st,
                                   const void* v, int64_t v_sb, int64_t v_st,
                                   const void* pq, int64_t pq_sb, int64_t pq_st,
                                   const void* pk, int64_t pk_sb, int64_t pk_st,
                                   const void* pv, int64_t pv_sb, int64_t pv_st,
                                   const uint8_t* token_mask,
                                   const void* o, int64_t o_sb, int64_t o_st,
                                   const void* po, int64_t po_sb, int64_t po_st,
                                   const float* lse,
                                   void* dq, int64_t dq_sb, int64_t dq_st,
                                   void* dk, int64_t dk_sb, int64_t dk_st,
                                   void* dv, int64_t dv_sb, int64_t dv_st,
                                   void* dpq, int64_t dpq_sb, int64_t dpq_st,
                                   void* dpk, int64_t dpk_sb, int64_t dpk_st,
                                   void* dpv, int64_t dpv_sb, int64_t dpv_st,
                                   float* bias_partials,
                                   int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                                   int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale,
                                   void* stream);

// Each window's CLS query attends its own CLS key/value and the window's w*w tokens:
// o (B, nW, heads, D), lse (B*nW, heads, 1).
S2_API int s2_cls_pool_fwd(int dtype,
                           const void* cq, int64_t cq_sb, int64_t cq_st,
                           const void* ck, int64_t ck_sb, int64_t ck_st,
                           const void* cv, int64_t cv_sb, int64_t cv_st,
                           const void* k, int64_t k_sb, int64_t k_st,
                           const void* v, int64_t v_sb, int64_t v_st,
                           void* o, float* lse,
                           int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                           int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale, void* stream);

// Gradients dcq, dck, dcv (B, nW, heads, D) and dk, dv (B, L, heads, D), strided like the inputs,
// e.g. the slots of packed (B, nW, 3, heads, D) and (B, L, 2, heads, D) gradients.
S2_API int s2_cls_pool_bwd(int dtype,
                           const void* dout, int64_t dout_sb, int64_t dout_st,
                           const void* cq, int64_t cq_sb, int64_t cq_st,
                           const void* ck, int64_t ck_sb, int64_t ck_st,
                           const void* cv, int64_t cv_sb, int64_t cv_st,
                           const void* k, int64_t k_sb, int64_t k_st,
                           const void* v, int64_t v_sb, int64_t v_st,
                           const void* o, int64_t o_sb, int64_t o_st,
                           const float* lse,
                           void* dcq, int64_t dcq_sb, int64_t dcq_st,
                           void* dck, int64_t dck_sb, int64_t dck_st,
                           void* dcv, int64_t dcv_sb, int64_t dcv_st,
                           void* dk, int64_t dk_sb, int64_t dk_st,
                           void* dv, int64_t dv_sb, int64_t dv_st,
                           int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                           int64_t grid_h, int64_t grid_w, int64_t window, int layout, float scale, void* stream);

#ifdef __cplusplus
}
#endif
