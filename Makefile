# `make run` starts the service on embedded defaults; `make test` runs lint and the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/hl7bridge.example.toml

.PHONY: run test lint format bench fixtures-send mutation clean

include tests/interop/interop.mk
-include tests/reliability/reliability.mk

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/hl7bridge serve --config $(CONFIG) --sandbox

test: $(BIN)/.installed interop-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)
	$(BIN)/python bench/dispatch.py --out docs/performance.md
	$(BIN)/python bench/outbox_write.py

# Mutation testing of the pure modules (pyproject [tool.mutmut]); slow, not part of `make test` or CI.
# MUTANTS narrows it, e.g. MUTANTS='hl7bridge.hl7.ack*'; survivors are listed at the end (docs/testing.md).
MUTANTS ?=
mutation: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[mutation]'
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

fixtures-send: $(BIN)/.installed
	$(BIN)/hl7bridge send --to 127.0.0.1:2575 fixtures/siu

clean:
	rm -rf $(VENV) var .pytest_cache tests/interop/node_modules mutants
