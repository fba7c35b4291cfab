# edgesmith: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both install what they need first (`make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ES := $(VENV)/bin/edgesmith
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo compress distill finetune export bench report all clean help bench-llamacpp

# The pipeline: every stage target runs RECIPE up to that stage (stages already up to date are skipped).
# MODEL=, DATA=, OUT=, QUANTS= override the recipe's start model, training data, output root, GGUF types.
RECIPE ?= recipes/smollm2-edge-cpu.yaml
MODEL ?=
DATA ?=
OUT ?=
QUANTS ?=
RUN_ARGS ?=
OVERRIDES = $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT)) $(if $(DATA),--data $(DATA)) $(if $(QUANTS),--quants $(QUANTS)) $(RUN_ARGS)
# finetune/all need a recipe with a finetune stage: theirs unless RECIPE= is given
given = $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),$(1))

help:
	@echo "make setup      create .venv and install everything (cached llama-cpp-python build)"
	@echo "make test       setup, then the whole test suite (unit + slow end-to-end)"
	@echo "make test-fast  setup, then the unit tests only (-m 'not slow')"
	@echo "make demo       setup, then RECIPE end to end (default recipes/smollm2-edge-cpu.yaml -> out/demo)"
	@echo "make compress | distill | bench | report   RECIPE up to that stage"
	@echo "make export     MODEL (default: the embedded default) -> out/export: 5 GGUF + ONNX fp32/int8 + Modelfiles"
	@echo "make finetune   recipes/lora-alpaca.yaml (LoRA on DATA, merged) up to merge"
	@echo "make all        recipes/smollm2-all.yaml: compress -> finetune -> export -> bench -> report"
	@echo "make bench BENCH_ARTIFACTS='a.gguf dir/'   benchmark any artifacts instead (BENCH_REMOTE=user@host)"
	@echo "make clean      remove build outputs (keeps .venv, the cache and out/)"
	@echo "variables: RECIPE= MODEL= DATA= OUT= QUANTS= RUN_ARGS='--set stages.prune.intermediate_size=768'"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh scripts/ggml_flags.sh
	bash scripts/setup.sh
	@touch $@

# the whole suite: unit tests + slow end-to-end tests on the real model (CI runs this)
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# unit tests only (< 10 min on 2 cores)
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(ES) run $(RECIPE) $(OVERRIDES)

compress: setup
	$(ES) run $(RECIPE) --until prune $(OVERRIDES)

distill: setup
	$(ES) run $(RECIPE) --until distill $(OVERRIDES)

finetune: setup
	$(ES) run $(call given,recipes/lora-alpaca.yaml) --until merge $(OVERRIDES)

# `make export`: MODEL (default: the embedded default) -> OUT (default out/export): the five GGUF types (or QUANTS),
# ONNX fp32 + int8 and one Modelfile per GGUF. With RECIPE= it runs that recipe up to its export stage instead.
EXPORT_QUANTS ?= F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0
export: setup
ifeq ($(filter command line environment,$(origin RECIPE)),)
	$(ES) export $(or $(MODEL),default) --out $(or $(OUT),out/export) --gguf $(or $(QUANTS),$(EXPORT_QUANTS)) --onnx --onnx-quant int8 --modelfile
else
	$(ES) run $(RECIPE) --until export $(OVERRIDES)
endif

report: setup
	$(ES) run $(RECIPE) --only report $(OVERRIDES)

all: setup
	$(ES) run $(call given,recipes/smollm2-all.yaml) $(OVERRIDES)

# `make bench` runs RECIPE up to its bench stage; with BENCH_ARTIFACTS it benchmarks those instead
# (HF dirs, .gguf files, ONNX dirs or `edgesmith export` dirs) into BENCH_OUT/bench.json + report.
BENCH_ARTIFACTS ?=
BENCH_OUT ?= out/bench
BENCH_ARGS ?= --max-chunks 20 --tasks arc_easy,piqa,winogrande,boolq,copa --limit 200 --latency
# BENCH_REMOTE=user@host runs the same harness on a device over SSH (your keys; edgesmith[device] venv there)
BENCH_REMOTE ?=
bench: setup
ifeq ($(strip $(BENCH_ARTIFACTS)),)
	$(ES) run $(RECIPE) --until bench $(OVERRIDES)
else
	$(ES) bench $(BENCH_ARTIFACTS) $(BENCH_ARGS) $(if $(BENCH_REMOTE),--remote $(BENCH_REMOTE)) --json $(BENCH_OUT)/bench.json
	$(ES) report $(BENCH_OUT)/bench.json --out $(BENCH_OUT)/report
endif

# our GGUF perplexity / pp512 / tg128 vs llama.cpp's own llama-perplexity / llama-bench (built from the sdist)
bench-llamacpp: setup
	$(PY) studies/compare_llamacpp.py --threads 1,2 --max-chunks 10 --repeat 3 --rounds 10

clean:
	rm -rf build dist *.egg-info .pytest_cache
