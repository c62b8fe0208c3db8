# cotune: two commands a newcomer needs (see README):
#   make demo   - install everything into .venv and run the main job on the shipped embedded tiny model
#   make test   - install everything into .venv and run the whole test suite (fast + slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast rebuild-check lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned to the CPU wheel: anything unpinned would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
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
