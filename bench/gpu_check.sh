#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a GPU machine (python3 with torch + CUDA, nvcc, cmake,
# ninja, pybind11, scikit-build-core; no network needed). Run from anywhere:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Stages (each one's failure is recorded and the next stages still run; the whole script keeps
# to a time budget, BUDGET_S, default 540 s):
#   env        GPU, driver, nvcc, torch                       -> summary.txt
#   build      pip install --no-build-isolation . (ANY4_CUDA=ON, this GPU's architecture)
#   tests      tests/test_gemm_cuda.py, test_gpu_layout.py, test_gemm_api.py, test_ops.py, test_nn.py (pytest; QuantLinear GPU path, compile, CUDA graphs)
#   memcheck   compute-sanitizer --tool memcheck  on bench/gpu_sanitize_case.py
#   racecheck  compute-sanitizer --tool racecheck on the same case
#   bench      bench/gemm_cuda_bench.py (vs bf16 cuBLAS and torch int4 tinygemm)
#   initcheck  compute-sanitizer --tool initcheck, if time is left
# Files written under $OUT (7): summary.txt, build.log, tests.log, sanitizer.log, bench.log,
# gemm_cuda_bench.json, gemm_cuda_bench.md. Exit status: 0 when every stage passed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/any4_gpu_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((T0 + BUDGET_S - $(date +%s))); }

# stage NAME LOG LIMIT_S CMD...: runs CMD under a timeout (capped by the remaining budget),
# appends its output to $OUT/LOG, records the outcome; never aborts the script.
stage() {
  local name=$1 log=$2 limit=$3
  shift 3
  local left
  left=$(remaining)
  if [ "$left" -le 20 ]; then
    note "$name: SKIPPED (time budget)"
    FAILED=1
    return 0
  fi
  if [ "$limit" -gt $((left - 10)) ]; then limit=$((left - 10)); fi
  local s rc d verdict
  s=$(date +%s)
  echo "===== $name: $*" >>"$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  d=$(($(date +%s) - s))
  verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="TIMEOUT after ${limit}s"
  elif [ $rc -ne 0 ]; then
    verdict="FAILED (exit $rc)"
  fi
  [ "$verdict" = ok ] || FAILED=1
  note "$name: $verdict (${d}s, log $log)"
  return 0
}

# ---------------------------------------------------------------- env
command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
} | tee -a "$SUMMARY"

CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
ARCH=${CUDA_ARCH:-${CAP:-90}-real}
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)

# ---------------------------------------------------------------- build
export ANY4_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
stage build build.log 300 $PY -m pip install --no-build-isolation --no-deps -v \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" .
$PY -c "import any4; print('build_info', any4.build_info())" 2>&1 | tee -a "$SUMMARY"

# ---------------------------------------------------------------- tests
stage tests tests.log 200 $PY -m pytest -q -rfE -p no:cacheprovider \
  tests/test_gemm_cuda.py tests/test_gpu_layout.py tests/test_gemm_api.py tests/test_ops.py tests/test_nn.py
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/tests: /' | tee -a "$SUMMARY"

# ---------------------------------------------------------------- sanitizers
if [ -n "$SANITIZER" ]; then
  stage memcheck sanitizer.log 150 "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check no \
    $PY bench/gpu_sanitize_case.py
  stage racecheck sanitizer.log 150 "$SANITIZER" --tool racecheck --error-exitcode 3 \
    $PY bench/gpu_sanitize_case.py
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | sed 's/^/sanitizer: /' | tee -a "$SUMMARY"
else
  note "memcheck/racecheck: SKIPPED (compute-sanitizer not found)"
  FAILED=1
fi

# ---------------------------------------------------------------- benchmark
BENCH_BUDGET=$(($(remaining) - 60))
[ "$BENCH_BUDGET" -gt 240 ] && BENCH_BUDGET=240
if [ "$BENCH_BUDGET" -ge 30 ]; then
  stage bench bench.log $((BENCH_BUDGET + 45)) $PY bench/gemm_cuda_bench.py --out "$OUT" --budget-s "$BENCH_BUDGET"
else
  note "bench: SKIPPED (time budget)"
  FAILED=1
fi

# ---------------------------------------------------------------- extra, if time is left
if [ -n "$SANITIZER" ] && [ "$(remaining)" -gt 100 ]; then
  stage initcheck sanitizer.log 90 "$SANITIZER" --tool initcheck --error-exitcode 3 \
    $PY bench/gpu_sanitize_case.py
fi

note "total: $(($(date +%s) - T0))s"
if [ -f "$OUT/gemm_cuda_bench.md" ]; then cat "$OUT/gemm_cuda_bench.md"; fi
echo "===== summary"
cat "$SUMMARY"
exit $FAILED
