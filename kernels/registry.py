"""Every shipped kernel configuration, gathered from the kernel modules, for the compile gate.

An entry is ``{"name", "module", "fn", "signature", "constexprs", "attrs", "num_warps",
"num_stages", "dtype", "real"}``: the ``@triton.jit`` function, an ``ASTSource`` signature
(pointer dtypes, scalar types, ``"constexpr"``), the constexpr values the launchers pick, and the
launch options. ``real`` marks the bf16 configs of the Sapiens2 shapes (norm widths 768 / 1024 /
1280 / 1536 / 2432 and the 5B FFN width 9728, head dims 64 / 76 / 80, the model's MHA and GQA head
counts): what the CI gate compiles by default. The rest (fp16, fp32 where cheap, head dim 128)
are compiled by ``run_gate(only_real_shapes=False)`` / ``compile_gate --all``.

``SHIPPED_CONFIGS`` is the full list (built on first access: it imports every kernel module).
"""

from __future__ import annotations

import torch

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_OWN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # norm / SwiGLU / QK-norm+RoPE: all cheap


def _tag(c: dict, module: str, real: bool) -> dict:
    c.setdefault("module", module)
    c.setdefault("dtype", next((d for d in ("bf16", "fp16", "fp32") if d in c["name"]), None))
    c.setdefault("real", real)
    return c


def _build() -> list[dict]:
    from . import attention, column_sum, qk_norm_rope, rms_norm, swiglu, window_attention

    out = [_tag(c, "column_sum", "bf16" in c["name"]) for c in column_sum.shipped_configs()]
    for dt in _OWN_DTYPES:
        bf16 = dt == torch.bfloat16
        out += [_tag(c, "rms_norm", bf16) for c in rms_norm.shipped_configs((dt,))]
        out += [_tag(c, "swiglu", bf16) for c in swiglu.shipped_configs((dt,))]
        out += [_tag(c, "qk_norm_rope", bf16 and "D=128" not in c["name"]) for c in qk_norm_rope.shipped_configs((dt,))]
    for module, mod in (("attention", attention), ("window_attention", window_attention)):
        for c in mod.SHIPPED_CONFIGS:
            out.append(_tag(dict(c), module, c.get("real", "fp16" not in c["name"] and "_d128_" not in c["name"])))
    return out


_CACHE: list[dict] | None = None


def shipped_configs(real_shapes_only: bool = True) -> list[dict]:
    """The shipped configs; ``real_shapes_only``: only the bf16 real-shape ones (``real``)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = _build()
    return [c for c in _CACHE if c["real"] or not real_shapes_only]


def __getattr__(name: str):
    if name == "SHIPPED_CONFIGS":
        return shipped_configs(real_shapes_only=False)
    raise AttributeError(name)
