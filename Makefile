# One command each for the tests and the main job; both create or reuse the virtual environment.
#   make test    set up .venv (torch first, then this package without build isolation), run the tests
#   make bench   same set-up, then the main job (FLOPs table and the quick benchmark report)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.sapiens2-installed
PYTEST_ARGS ?=

.PHONY: setup test bench gpu-check clean

setup: $(STAMP)

# The CUDA sources are prerequisites too: a changed kernel or binding rebuilds the extension.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/kernels/* csrc/bindings/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: the package builds against it without build isolation; ninja compiles the
	# optional CUDA extension sapiens2._C in parallel (it builds when nvcc is found)
	$(PY) -m pip install -q "torch>=2.14" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# xtcocotools' wheel is built against numpy 1 and fails to import under numpy 2: rebuild it from source so
	# the keypoint-AP tests compare it with pycocotools (the metric falls back to pycocotools if this fails)
	-$(PY) -m pip install -q --no-build-isolation --no-binary xtcocotools --force-reinstall --no-deps xtcocotools
	$(PY) -c "from sapiens2.ops.backend import available_backends as b; print('sapiens2 CUDA extension:', b()['cuda'])"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not gpu" $(PYTEST_ARGS)
	# the GPU tests in their own process (all skipped without a GPU): the kernel tests above run
	# Triton's interpreter on CPU tensors, and that mode is process-wide
	$(PY) -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
	# the microbenchmarks once each as a smoke test (timings only mean something on a GPU)
	$(PY) -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/sapiens2 flops --all
	$(VENV)/bin/sapiens2 bench --quick --out bench-report

# The prepared GPU check for a bare GPU machine without network: the machine's own python3 and torch,
# nothing installed from a registry (scripts/gpu_check.sh says what it runs and writes).
gpu-check:
	PYTHON=$${PYTHON:-python3} scripts/gpu_check.sh gpu-check

clean:
	rm -rf $(VENV) build *.egg-info
