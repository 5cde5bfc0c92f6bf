"""Launch plans of the official Sapiens2 code's GPU kernels (filled in with the official block's
stand-ins: fused RMSNorm and flash SDPA). See ``sapiens2/ops/plan.py``."""
