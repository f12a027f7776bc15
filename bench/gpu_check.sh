#!/usr/bin/env bash
# The whole GPU check in one call (about 7-8 minutes on an H100/H200), every stage under its own timeout:
#
#   1. install the wheels the GPU image lacks (.whl/, made by bench/fetch_gpu_wheels.sh)
#   2. build the CUDA kernels for sm_90 (16 jobs)
#   3. GPU tests: ops on every backend and dtype (CUDA, Triton compiled for real, C++ on CPU tensors), the
#      runtime incl. CUDA-graph capture and replay, the model families at block level where present
#   4. the op roofline at DiT-XL/2 and PixArt sizes (GB/s and fraction of the measured copy bandwidth,
#      CUDA vs Triton vs eager), bf16
#   5. end to end, DiT-XL/2 shape, bf16, 50 DDIM steps, 2 and 8 images: diffusers eager, torch.compile of the
#      original, FirstBlockCache and DBCache at their defaults, ours at 0/25/50% with CUDA graphs
#   6. a summary, printed last
#
# Everything lands in $OUT (default bench/results/gpu): summary.md, the result JSON/Markdown of each
# benchmark, and every log bundled in one gpu_logs.tar.gz (the device tool returns at most 8 files).
#
#   bash bench/gpu_check.sh                   # on a machine whose python3 has a CUDA torch
#   PY=python SKIP_E2E=1 bash bench/gpu_check.sh
#
# Without a CUDA device it stops at once, saying so (exit code 2).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing was run." >&2
  echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
LOGS=$(mktemp -d)
status() { printf '| %s | %s | %s s |\n' "$1" "$2" "$(elapsed)" >> "$LOGS/stages.md"; }
printf '| stage | result | at |\n|---|---|---|\n' > "$LOGS/stages.md"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$LOGS/nvidia_smi.csv" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  > "$LOGS/versions.txt" 2>&1
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$LOGS/versions.txt" 2>&1

echo "== [$(elapsed)s] build (CUDA kernels for sm_90, 16 jobs)"
if L2C_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout ${BUILD_TIMEOUT:-240} "$PY" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; then
  status build ok
else
  status build "FAILED (exit $?)"; tail -n 40 "$LOGS/build.log"
fi
"$PY" -c "import json, l2c_kernels; print(json.dumps(l2c_kernels.build_info(), indent=1, default=str))" \
  > "$OUT/build_info.json" 2>&1

echo "== [$(elapsed)s] GPU tests"
TESTS="tests/ops tests/runtime tests/test_build.py"
[ -d tests/families ] && TESTS="$TESTS tests/families"
timeout ${TEST_TIMEOUT:-150} "$PY" -m pytest -q --maxfail=50 -p no:cacheprovider $TESTS -k "not cpu or cuda" \
  > "$LOGS/pytest_gpu.log" 2>&1
rc=$?; status "tests ($TESTS)" "exit $rc: $(tail -n 1 "$LOGS/pytest_gpu.log")"

echo "== [$(elapsed)s] op roofline (bf16)"
timeout ${OPS_TIMEOUT:-75} "$PY" bench/bench_ops.py --device cuda --dtypes bf16 \
  --shapes "DiT-XL/2 256px,DiT-XL/2 512px,PixArt 1024px" --repeats 11 --sample-ms 5 --out "$OUT" \
  > "$LOGS/bench_ops.log" 2>&1
status "op roofline" "exit $?"

if [ -z "${SKIP_E2E:-}" ]; then
  echo "== [$(elapsed)s] end to end, DiT-XL/2 shape, bf16, 50 steps"
  timeout ${E2E_TIMEOUT:-260} "$PY" bench/bench_e2e.py --device cuda --dtype bf16 --images 2,8 --steps 50 \
    --rounds 5 --compile --budget-s $(( ${E2E_TIMEOUT:-260} - 40 )) --out "$OUT" > "$LOGS/bench_e2e.log" 2>&1
  status "end to end" "exit $?"
fi

echo "== [$(elapsed)s] summary"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"; echo
  echo '```'; cat "$LOGS/nvidia_smi.csv" "$LOGS/versions.txt"; echo '```'; echo
  cat "$LOGS/stages.md"; echo
  echo "## tests"; echo '```'; grep -E "passed|failed|error" "$LOGS/pytest_gpu.log" | tail -n 15; echo '```'; echo
  for f in "$OUT"/ops_cuda.md "$OUT"/e2e_dit-xl_cuda_bf16.md; do [ -f "$f" ] && { cat "$f"; echo; }; done
} > "$OUT/summary.md"
tar -czf "$OUT/gpu_logs.tar.gz" -C "$LOGS" . 2>/dev/null
cat "$LOGS/stages.md"
grep -E "passed|failed" "$LOGS/pytest_gpu.log" | tail -n 3
grep -h "^| " "$OUT"/ops_cuda.md 2>/dev/null | grep -E "bf16" | awk -F'|' '{print "|"$2"|"$3"|"$14"|"$16"|"}' | head -n 24
grep -h "^| " "$OUT"/e2e_dit-xl_cuda_bf16.md 2>/dev/null
echo "gpu_check: done in $(elapsed) s; results in $OUT"
