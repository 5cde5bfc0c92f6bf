"""Which backend implements which op. Implementations are imported on first use only, so
importing ``sapiens2`` never imports triton or the compiled extension."""

from .backend import register_impl

for _op in ("rms_norm", "rms_norm_backward", "add_rms_norm", "add_rms_norm_backward", "swiglu",
            "swiglu_backward", "swiglu_recompute_backward", "swiglu_bias_backward", "qk_norm_rope", "qk_norm_rope_backward", "attention", "attention_backward",
            "window_attention", "window_attention_backward", "cls_pool", "cls_pool_backward",
            "window_attention_qkv_backward", "cls_pool_kv_backward", "partial_sums", "attention_qkv_backward"):
    register_impl(_op, "triton", "sapiens2.ops._triton", _op)

# The hand-written CUDA kernels (csrc/, extension sapiens2._C); one adapter module per family.
_CUDA_FAMILIES = {
    "rms_norm": ("rms_norm", "rms_norm_backward", "add_rms_norm", "add_rms_norm_backward"),
    "swiglu": ("swiglu", "swiglu_backward", "swiglu_recompute_backward", "swiglu_bias_backward"),
    "qk_norm_rope": ("qk_norm_rope", "qk_norm_rope_backward"),
    "window_attention": ("window_attention", "window_attention_backward", "cls_pool", "cls_pool_backward",
                         "window_attention_qkv_backward", "cls_pool_kv_backward"),
    "partial_sums": ("partial_sums",),
}
for _family, _ops in _CUDA_FAMILIES.items():
    for _op in _ops:
        register_impl(_op, "cuda", f"sapiens2.ops.cuda.{_family}", _op)
