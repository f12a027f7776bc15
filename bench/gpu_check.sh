#!/usr/bin/env bash
# One call on a CUDA machine: build the CUDA kernels, run the op and runtime tests on the GPU, and
# time the fused ops and compile_schedule there. Everything lands in $OUT (default
# bench/results/gpu): build log, build_info, pytest log, bench JSON + Markdown; a short summary is
# printed last.
#
#   bash bench/gpu_check.sh                 # on a machine whose python3 has a CUDA torch
#   PY=python bash bench/gpu_check.sh       # another interpreter
#
# Python packages the machine lacks (diffusers, for the runtime tests and benchmarks) may be put
# as wheels in .whl/ beside this repository's root; they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia_smi.csv" 2>&1

echo "== build (CUDA kernels for sm_90)"
if ! L2C_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; exit 1
fi
"$PY" -c "import json, l2c_kernels; print(json.dumps(l2c_kernels.build_info(), indent=1, default=str))" \
  > "$OUT/build_info.json" 2>&1

echo "== tests on the GPU (ops on every backend, runtime incl. CUDA graphs)"
"$PY" -m pytest -q -p no:cacheprovider tests/ops tests/runtime tests/test_build.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit code $?"

echo "== benchmarks"
"$PY" bench/bench_ops.py --device cuda --dtypes fp32,bf16 --out "$OUT" > "$OUT/bench_ops.log" 2>&1
"$PY" bench/bench_compile_schedule.py --device cuda --dtype bf16 --xl --out "$OUT" > "$OUT/bench_compile_schedule.log" 2>&1

echo "== summary"
tail -n 3 "$OUT/pytest_gpu.log"
grep -h "^| " "$OUT"/ops_cuda*.md 2>/dev/null | head -n 40
grep -h "^| " "$OUT"/compile_schedule_cuda*.md 2>/dev/null | head -n 20
