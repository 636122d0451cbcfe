# paystream: the two commands are `make run` and `make test`; both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint typecheck install dev bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[embedded,dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

## Start the embedded stack, drive a demo checkout load through it, print a summary, stop.
run: $(STAMP)
	$(BIN)/paystream demo

## Lint, type-check, then run the whole test suite against real services.
test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Keep the embedded stack up until Ctrl-C.
dev: $(STAMP)
	$(BIN)/paystream dev

clean:
	rm -rf $(VENV) .paystream .mypy_cache .ruff_cache .pytest_cache
