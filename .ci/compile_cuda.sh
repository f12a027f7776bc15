#!/usr/bin/env bash
# Compiles every CUDA source under csrc/ (device code and launchers; plain CUDA, no torch) for
# sm_80 and sm_90, failing on the first error. Needs only nvcc, no GPU and no CUDA build of torch.
#
#   .ci/compile_cuda.sh            # uses nvcc from PATH, else $CUDA_HOME/bin/nvcc
#   NVCC=/path/to/nvcc .ci/compile_cuda.sh
#
# Flags mirror torch's extension build: torch's default -D__CUDA_NO_HALF*/BFLOAT16* defines (no
# implicit half/bfloat16 conversions), -O3, and warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: SKIP (nvcc not found; set NVCC or CUDA_HOME, or put nvcc on PATH)"
  exit 0
fi

mapfile -t SOURCES < <(find csrc -name '*.cu' | LC_ALL=C sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda: no .cu files under csrc/" >&2
  exit 1
fi

OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT

FLAGS=(
  -c -std=c++17 -O3
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Icsrc -Icsrc/include
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  -Werror all-warnings
  -Xcompiler -Wall
)

echo "compile_cuda: $("$NVCC" --version | grep -o 'release [0-9.]*' || echo "$NVCC")"
for src in "${SOURCES[@]}"; do
  obj="$OUT_DIR/$(echo "$src" | tr '/' '_').o"
  echo "compile_cuda: $src"
  "$NVCC" "${FLAGS[@]}" "$src" -o "$obj"
done
echo "compile_cuda: OK (${#SOURCES[@]} files, sm_80 + sm_90)"
