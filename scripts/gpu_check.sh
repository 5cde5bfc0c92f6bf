#!/usr/bin/env bash
# The one prepared GPU check, for a bare GPU machine without network access (`make gpu-check`).
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: gpu-check/; PYTHON=python3, TOTAL_S=450)
#
# Runs under the machine's own python3 and its torch/triton (nothing is installed from a registry):
#   1. builds this package in place with its CUDA extension (pip --no-index --no-deps
#      --no-build-isolation -e .; if pip cannot, setup.py build_ext --inplace into a staging copy);
#   2. runs the GPU tests (tests/test_gpu.py: every op at the real shapes, forward and backward, each
#      backend, the tolerance rule) -> OUT/gpu_tests.log, OUT/gpu_tests.xml;
#   3. times ours against SDPA (flash, cuDNN, efficient), FlexAttention (compiled), flash-attn /
#      xformers when importable, and PyTorch eager for the row ops -> OUT/gpu_check.json, .md
#      (sapiens2/bench/gpu_check.py), within what is left of TOTAL_S seconds.
# Exit status: that of the GPU tests (the timings never fail the check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
log() { echo "[gpu-check $(elapsed)s] $*"; }

log "$($PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader 2>/dev/null || true

# 1. build in place (ninja, all cores)
export MAX_JOBS=${MAX_JOBS:-$(nproc)} SAPIENS2_BUILD_CUDA=${SAPIENS2_BUILD_CUDA:-1}
RUN_DIR=$PWD
if $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  log "built in place (pip -e)"
else
  log "pip could not install in place (see $OUT/build.log); building with setup.py into a staging copy"
  RUN_DIR=$(mktemp -d)/sapiens2-src
  mkdir -p "$RUN_DIR"
  cp -r setup.py pyproject.toml csrc kernels sapiens2 tests benchmarks "$RUN_DIR"/
  (cd "$RUN_DIR" && $PY setup.py -q build_ext --inplace >>"$RUN_DIR/../build_ext.log" 2>&1) ||
    { log "the extension did not build: tail of the log"; tail -20 "$RUN_DIR/../build_ext.log"; }
  cp -r "$RUN_DIR/kernels" "$RUN_DIR/sapiens2/kernels"   # what the package maps sapiens2.kernels to
fi
cd "$RUN_DIR"
$PY -c "from sapiens2.ops.backend import available_backends as b; print('backends:', b())" || exit 1

# 2. the GPU tests
log "GPU tests"
timeout $(( TOTAL_S * 2 / 3 - $(elapsed) > 60 ? TOTAL_S * 2 / 3 - $(elapsed) : 60 )) \
  $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rs --durations=8 \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}
log "GPU tests exit status $tests_rc"

# 3. the timings, in what is left of the budget
left=$(( TOTAL_S - $(elapsed) - 15 ))
log "timings (budget ${left}s)"
$PY -m sapiens2.bench.gpu_check --out "$OUT" --budget-s $(( left > 30 ? left : 30 ))
log "done"
exit "$tests_rc"
