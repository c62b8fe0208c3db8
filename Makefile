# cotune: two commands a newcomer needs (see README):
#   make demo   - install everything into .venv and run the main job on the shipped embedded tiny model
#   make test   - install everything into .venv and run the whole test suite (fast + slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast rebuild-check lint bench clean

# TORCH=cpu (default): the CPU build, torch==2.13.0+cpu, from pip as configured (a local wheel, a mirror) or else from
# PyTorch's CPU index. PyPI's plain `torch` is the multi-GB CUDA build on Linux, so the CPU build is named exactly.
# TORCH=cuda: PyPI's torch==2.13.0 (CUDA on Linux); for another CUDA version pass TORCH_INDEX=https://download.pytorch.org/whl/cu126.
TORCH ?= cpu
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: everything after it resolves against the build installed here.
ifeq ($(TORCH),cpu)
	$(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" \
	  || $(PY) -m pip install --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu"
else
	$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The quickstart comparison: prompt-only vs RL-only vs joint at equal budget, 3 seeds each, tracked in ./mlflow.db;
# then the report read back from MLflow (reports/quickstart/). The tiny model ships in embedded/weights/.
# --resume: a second `make demo` skips the runs already completed (same settings) instead of refusing their folders.
demo: install
	$(VENV)/bin/cotune run experiments/quickstart.yaml --resume
	$(VENV)/bin/cotune compare experiments/quickstart.yaml

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -rs --durations=15 -m "not rebuild"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not rebuild"

# The agent model's rebuild from its recipe lands in the band (~20 min on 2 cores: too long for CI's hour).
rebuild-check: install
	$(PY) -m pytest -q -rs -m rebuild

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
