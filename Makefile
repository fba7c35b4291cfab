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

.PHONY: setup test test-fast demo clean help bench

help:
	@echo "make setup      create .venv and install everything (cached llama-cpp-python build)"
	@echo "make test       setup, then the whole test suite (unit + slow end-to-end)"
	@echo "make test-fast  setup, then the unit tests only (-m 'not slow')"
	@echo "make demo       setup, then run edgesmith on the embedded default model (outputs in OUT=$(OUT))"
	@echo "make bench      setup, then benchmark BENCH_ARTIFACTS (default: the embedded GGUF) -> $(OUT)/bench.json + report"
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

# ---- distill / finetune (issue 6)
.PHONY: distill finetune
DISTILL_BUDGET ?= 15m
STUDENT ?= $(OUT)/pruned
FT_DATA ?= ../shared/data/instruct/alpaca_en_demo.json

# prune MODEL to ~69% of its non-embedding parameters (unless STUDENT exists), then distil it back from
# MODEL on teacher-generated answers (offline) for DISTILL_BUDGET of training
distill: setup
	@test -f $(STUDENT)/config.json || $(ES) prune $(MODEL) --intermediate-size 896 --round-to 128 --layer-importance magnitude --out $(STUDENT)
	$(ES) distill --recipe recipes/distill-default.yaml --teacher $(MODEL) --student $(STUDENT) --time-budget $(DISTILL_BUDGET) --out $(OUT)/distilled

# LoRA on the Alpaca demo (train/validation split by `edgesmith data prepare`), then merge into a plain HF checkpoint
finetune: setup
	$(ES) data prepare $(FT_DATA) --model $(MODEL) --out $(OUT)/data/alpaca
	$(ES) finetune --recipe recipes/lora-alpaca.yaml --model $(MODEL) --data $(OUT)/data/alpaca --out $(OUT)/lora-alpaca
	$(ES) merge $(MODEL) $(OUT)/lora-alpaca --out $(OUT)/lora-alpaca-merged

.PHONY: compress
# the default model pruned to widths that quantise cleanly (hidden 512, MLP 1024, 24 layers, 6/2 heads)
compress: setup
	$(ES) prune $(MODEL) --recipe recipes/prune-default.yaml --out $(OUT)/compress

# ---- export (issue 3)
.PHONY: export
EXPORT_GGUF ?= F16,Q4_0,Q4_K_M,Q5_K_M,Q8_0
# MODEL's full set in OUT/export: 5 GGUF files (llama.cpp converter + quantiser), ONNX fp32 + int8, Modelfiles, export.json
export: setup
	$(ES) export $(MODEL) --out $(OUT)/export --gguf $(EXPORT_GGUF) --onnx --onnx-quant int8 --modelfile

# accuracy + latency of BENCH_ARTIFACTS (HF dirs, .gguf files, ONNX dirs or `edgesmith export` dirs)
BENCH_ARTIFACTS ?= $(MODEL)
BENCH_ARGS ?= --max-chunks 20 --tasks arc_easy,piqa,winogrande,boolq,copa --limit 200 --latency
bench: setup
	$(ES) bench $(BENCH_ARTIFACTS) $(BENCH_ARGS) --json $(OUT)/bench.json
	$(ES) report $(OUT)/bench.json --out $(OUT)/bench-report
