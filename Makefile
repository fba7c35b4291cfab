# edgesmith: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both install what they need first (`make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ES := $(VENV)/bin/edgesmith
STAMP := $(VENV)/.setup-stamp
OUT ?= out/demo
MODEL ?= default
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo clean help

help:
	@echo "make setup      create .venv and install everything (cached llama-cpp-python build)"
	@echo "make test       setup, then the whole test suite (unit + slow end-to-end)"
	@echo "make test-fast  setup, then the unit tests only (-m 'not slow')"
	@echo "make demo       setup, then run edgesmith on the embedded default model (outputs in OUT=$(OUT))"
	@echo "make clean      remove build outputs (keeps .venv and the cache)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	@touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(ES) info $(MODEL)
	$(ES) chat $(MODEL) --prompt "What is the capital of France?" --max-new-tokens 48

clean:
	rm -rf build dist *.egg-info out .pytest_cache
