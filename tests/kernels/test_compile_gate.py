"""Hopper compile gate: every shipped config the real shapes use AOT-compiles for sm_90a without a
GPU, with no register spills and at most 227 KiB of shared memory; attention uses wgmma. Runs in
its own process, without the Triton interpreter this test session enables."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sm90a_gate_clean():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "sapiens2.kernels.compile_gate", "--target", "sm_90a", "--json"],
                       capture_output=True, text=True, env=env, timeout=1200)
    rows = json.loads(r.stdout)
    assert len(rows) > 100
    bad = [(x["kernel"], x["error"], x["spill_bytes"], x["shared_bytes"]) for x in rows
           if not x["compiled"] or x["spill_bytes"] or x["shared_bytes"] > 227 * 1024]
    assert not bad, bad
    assert r.returncode == 0
    kinds = {x["module"] for x in rows}
    assert kinds == {"rms_norm", "swiglu", "qk_norm_rope", "attention", "window_attention"}
    attn = [x for x in rows if x["kernel"].startswith(("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"))]
    assert attn and all(x["wgmma"] for x in attn), "the attention matmuls must use Hopper wgmma"
    for x in rows:
        assert x["target"] == "sm_90a" and x["registers"] <= 255
