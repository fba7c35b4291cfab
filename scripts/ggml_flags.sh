#!/usr/bin/env bash
# Print the llama.cpp CMake flags for the instruction sets this CPU reports (/proc/cpuinfo), never AMX
# (AMX segfaults in llama_decode on these machines). A non-native build with explicit flags, so the
# wheel is reproducible and the cache key (`--key`) names exactly what was enabled.
#   scripts/ggml_flags.sh          -> -DGGML_NATIVE=OFF -DGGML_AVX=ON ... -DGGML_AMX_TILE=OFF ...
#   scripts/ggml_flags.sh --key    -> avx2-fma-f16c-bmi2-avx512-avx512vbmi-avx512vnni-avx512bf16-avxvnni
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true) "
has() { for f in "$@"; do [[ "$flags" == *" $f "* ]] || return 1; done; }
onoff() { if has "$@"; then echo ON; else echo OFF; fi; }
declare -A opt=(
  [AVX]=$(onoff avx)  [AVX2]=$(onoff avx2)  [FMA]=$(onoff fma)  [F16C]=$(onoff f16c)  [BMI2]=$(onoff bmi2)
  [SSE42]=$(onoff sse4_2)
  [AVX_VNNI]=$(onoff avx_vnni)
  # llama.cpp's AVX512 path needs F, BW, VL, DQ, CD together
  [AVX512]=$(onoff avx512f avx512bw avx512vl avx512dq avx512cd)
)
if [ "${opt[AVX512]}" = ON ]; then
  opt[AVX512_VBMI]=$(onoff avx512vbmi); opt[AVX512_VNNI]=$(onoff avx512_vnni); opt[AVX512_BF16]=$(onoff avx512_bf16)
else
  opt[AVX512_VBMI]=OFF; opt[AVX512_VNNI]=OFF; opt[AVX512_BF16]=OFF
fi
order=(SSE42 AVX AVX2 FMA F16C BMI2 AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16)
if [ "${1:-}" = --key ]; then
  key=""
  for k in "${order[@]}"; do [ "${opt[$k]}" = ON ] && key+="${key:+-}$(tr 'A-Z' 'a-z' <<<"${k//_/}")"; done
  echo "${key:-generic}"
else
  out="-DGGML_NATIVE=OFF"
  for k in "${order[@]}"; do out+=" -DGGML_$k=${opt[$k]}"; done
  echo "$out -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
