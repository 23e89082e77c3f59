# Two commands on a fresh machine:  `make demo` runs a study, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# A CPU build is enough to try it; on a GPU machine use e.g. TORCH='torch' (CUDA wheels).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint ui

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/hpo run experiments/digits.toml

test: $(STAMP)
	$(BIN)/ruff check service tests benchmarks alembic
	$(BIN)/ruff format --check service tests benchmarks alembic
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check --fix service tests benchmarks alembic
	$(BIN)/ruff format service tests benchmarks alembic

ui: $(STAMP)
	$(BIN)/hpo ui
