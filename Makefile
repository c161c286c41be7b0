# One entry point for humans and CI. `make sandbox` and `make test` bootstrap a
# local virtualenv from nothing (Python 3.11+ is the only prerequisite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: sandbox serve test lint typecheck unit promtool bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

sandbox: $(STAMP)
	$(BIN)/clopos-hydrator sandbox

serve: $(STAMP)
	$(BIN)/clopos-hydrator serve

lint: $(STAMP)
	$(BIN)/ruff check app tests $(wildcard benchmarks)
	$(BIN)/ruff format --check app tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The alert-rule tests need promtool: installed here when missing and possible (root with
# apt-get, as in CI); otherwise .ci/ensure-promtool says so and those tests skip.
promtool:
	@.ci/ensure-promtool

test: lint typecheck promtool unit

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/transport.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
