"""``sapiens2.ops``: every fused op of the model as a ``torch.library`` custom op.

Each op has a plain PyTorch reference implementation (the definition), a fake (meta)
implementation, registered autograd (its backward is one dispatched op too) and a FLOP formula.
The backend (reference / triton / cuda) is chosen per call: see ``sapiens2.ops.backend``.
"""

from . import _registry  # noqa: F401  (declares the Triton/CUDA implementations, lazily imported)
from .attention import attention
from .attention_packed import attention_qkv
from .attention_projected import attention_projected
from .backend import available_backends, current_backend, use_backend
from .determinism import deterministic, set_deterministic
from .qk_norm_rope import qk_norm_rope
from .rms_norm import rms_norm
from .swiglu import swiglu, swiglu_ffn
from .window_attention import cls_pool, window_attention
from .window_attention_packed import cls_pool_kv, window_attention_qkv
from .window_attention_proj import window_attention_projected

__all__ = [
    "attention",
    "attention_projected",
    "attention_qkv",
    "available_backends",
    "cls_pool",
    "cls_pool_kv",
    "current_backend",
    "deterministic",
    "qk_norm_rope",
    "rms_norm",
    "set_deterministic",
    "swiglu",
    "swiglu_ffn",
    "use_backend",
    "window_attention",
    "window_attention_projected",
    "window_attention_qkv",
]
