# The two commands of the README: `make demo` and `make test`. Both work on a fresh machine
# with only Python >= 3.11 and the package index.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[plot]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxem demo --plot demo.png

# One worker per core: most of the suite is XLA compilation, which runs on one thread.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n auto --dist worksteal

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check jaxem tests benchmarks

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) demo.png
