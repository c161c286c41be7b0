# One entry point for humans and CI. `make sandbox` and `make test` bootstrap a
# local virtualenv from nothing (Python 3.11+ is the only prerequisite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: running needs only the runtime dependencies; tests add the dev tools.
RUNTIME_STAMP := $(VENV)/.runtime
STAMP  := $(VENV)/.installed
SANDBOX_ARGS ?=
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes \
	--index-url https://pypi.org/simple --custom-compile-command "make lock"

.PHONY: sandbox serve test lint typecheck unit promtool bench lock container-check clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP) $(RUNTIME_STAMP)

sandbox: $(RUNTIME_STAMP)
	$(BIN)/clopos-hydrator sandbox $(SANDBOX_ARGS)

serve: $(RUNTIME_STAMP)
	$(BIN)/clopos-hydrator serve

lint: $(STAMP)
	$(BIN)/ruff check app tests $(wildcard benchmarks)
	$(BIN)/ruff format --check app tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (pytest-xdist); TEST_WORKERS=0 runs every test in this one process.
TEST_WORKERS ?= 2
unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The alert-rule tests need promtool: installed here when missing and possible (root with
# apt-get, as in CI); otherwise .ci/ensure-promtool says so and those tests skip.
promtool:
	@.ci/ensure-promtool

test: lint typecheck promtool unit

# Every benchmark, one table, docs/benchmarks.md (about 8–11 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# The image installs exactly these (hashed) versions. Re-run after changing dependencies
# in pyproject.toml; tests/test_deploy_config.py fails while the lock misses one.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements.lock
	echo 'setuptools>=70.1' | $(BIN)/uv pip compile - $(LOCK_FLAGS) -o requirements-build.lock

# Builds the image with a real Docker engine, runs it and checks it (minutes, gigabytes:
# not part of `make test`). See scripts/container-check.sh.
container-check:
	bash scripts/container-check.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
