# One command each for the tests and the main job; both create or reuse the virtual environment.
#   make test    set up .venv (torch first, then this package without build isolation), run the tests
#   make bench   same set-up, then the main job (FLOPs table and the quick benchmark report)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.sapiens2-installed
PYTEST_ARGS ?=

.PHONY: setup test bench clean

setup: $(STAMP)

# The CUDA sources are prerequisites too: a changed kernel or binding rebuilds the extension.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/kernels/* csrc/bindings/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: the package builds against it without build isolation; ninja compiles the
	# optional CUDA extension sapiens2._C in parallel (it builds when nvcc is found)
	$(PY) -m pip install -q "torch>=2.14" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -c "from sapiens2.ops.backend import available_backends as b; print('sapiens2 CUDA extension:', b()['cuda'])"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)
	# the microbenchmarks once each as a smoke test (timings only mean something on a GPU)
	$(PY) -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/sapiens2 flops --all
	$(VENV)/bin/sapiens2 bench --quick --out bench-report

clean:
	rm -rf $(VENV) build *.egg-info
