# Two entry points on a fresh machine: `make train` and `make test`.
# Each creates (or reuses) .venv, installs torch==2.13.0 first, then bnlab with its dev extras,
# then builds bnlab's C++ kernel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup train test lint bench reproduce report clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The C++ batch-norm kernel, built ahead of time so that no first forward compiles (a no-op
# when a build for this torch exists). Without a compiler bnlab still works, with its slower
# eager kernel: the failure is printed, and setup goes on.
setup: $(VENV)/.installed
	@$(BIN)/bnlab build || echo "make setup: the C++ batch-norm kernel was not built (above)."

train: setup
	$(BIN)/bnlab train $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/bnlab bench $(ARGS)

reproduce: setup
	$(BIN)/bnlab reproduce $(ARGS)

report: setup
	$(BIN)/bnlab report $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
