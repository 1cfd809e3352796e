# Quickstart targets (README): `make bench` runs the quick claim checks, `make test` runs the tests.
# torch==2.13.0 is installed before the package so that pip never resolves a CUDA build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup bench bench-full speed test test-slow readme

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

bench: setup
	$(BIN)/normlab bench --quick --out bench-out

bench-full: setup
	$(BIN)/normlab bench --out benchmarks/results/latest

speed: setup
	$(BIN)/normlab speed

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

readme: setup
	$(BIN)/python scripts/update_readme.py
