# The few commands people type. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
# Offline by default: nothing a demo or a test runs may reach beyond 127.0.0.1.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=
# make test runs the suite in this many processes (tests/conftest.py groups them; 1 = no pytest-xdist).
# Two on two cores: a third was no faster (19.0 vs 19.3 min), each test slower under the contention.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint format typecheck bench clean

install: $(STAMP)

# torch first, from the pinned version (the CPU build on this disk, the CUDA build on a GPU machine),
# then the project with torch constrained to that version so nothing pulls a second torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[dev]'
	touch $@

demo: install
	$(PY) -m launch train configs/tiny-cpu.yaml

# The whole suite: lint, types, then every test tier (unit, integration, slow; gpu skips without one).
test: install lint typecheck
	./scripts/system-deps.sh
	$(PY) -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench.preconditioner_overhead
	$(PY) -m bench.adapters
	$(PY) -m bench.data_pipeline
	$(PY) -m bench.tracking_overhead
	$(PY) -m bench.local_threads

clean:
	rm -rf runs .cache .pytest_cache .mypy_cache .ruff_cache
