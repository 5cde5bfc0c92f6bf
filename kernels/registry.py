"""Every shipped kernel configuration, gathered from the kernel modules, for the compile gate."""

from __future__ import annotations

import torch


def shipped_configs(real_shapes_only: bool = True) -> list[dict]:
    """Entries ``{"name", "fn", "signature", "constexprs", "attrs", "num_warps", "num_stages"}``.

    ``real_shapes_only``: the bf16 configs the Sapiens2 shapes use (what the CI gate compiles);
    otherwise every config, fp16 included.
    """
    from . import attention, qk_norm_rope, rms_norm, swiglu, window_attention

    dtypes = (torch.bfloat16,) if real_shapes_only else (torch.bfloat16, torch.float16)
    widths = rms_norm.REAL_WIDTHS if real_shapes_only else rms_norm.REAL_WIDTHS + rms_norm.WIDE
    out = rms_norm.shipped_configs(dtypes, widths) + swiglu.shipped_configs(dtypes) + qk_norm_rope.shipped_configs(dtypes)
    for module in (attention, window_attention):
        for c in module.SHIPPED_CONFIGS:
            if not real_shapes_only or "fp16" not in c["name"]:
                out.append(c)
    for c in out:
        c.setdefault("module", c["fn"].fn.__module__.rsplit(".", 1)[-1])
    return out
