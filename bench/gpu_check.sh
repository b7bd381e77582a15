#!/usr/bin/env bash
# One run of every CUDA check on a GPU machine, within BUDGET_S (default 540 s), that always
# leaves results. Needs python3 with torch + CUDA, nvcc, cmake, ninja, pybind11 and
# scikit-build-core; no network (pip runs offline). Run from anywhere:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Stages, in this order, each under its own timeout (capped by what is left of the budget); each
# writes its line to $OUT/summary.txt the moment it finishes, so a run cut short still says how
# far it got:
#   preflight    Python headers, cmake, nvcc, compute-sanitizer, pytest-timeout, torch, GPU
#   build        pip install . offline (PIP_NO_INDEX=1), this GPU's architecture only  <= 240 s
#   selfcheck    only when the build (or `import any4` with CUDA) failed: nvcc alone builds
#                bench/gpu_selfcheck.cpp (tensor-core and dequantize kernels, 4-, 3- and 2-bit
#                codes, vs their CPU emulation and float64), so the kernels are still checked
#                                                                                        <= 200 s
#   smoke        bench/gpu_sanitize_case.py --smoke (a few products vs float64)         <= 60 s
#   memcheck     compute-sanitizer memcheck on bench/gpu_sanitize_case.py               <= 150 s
#   tests        the GPU tests only (-m gpu; 3/2-bit kernels included), -v, per-test
#                timeout, PYTHONHASHSEED=0                                              <= 150 s
#   bench-quick  bench/gemm_cuda_bench.py --quick (2 shapes, M in {1, 16, 128})         <= 75 s
#   bench-full   bench/gemm_cuda_bench.py --merge (the rest, what the budget leaves)
#   initcheck    compute-sanitizer initcheck on the same case                           <= 75 s
# Sanitizers run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the caching allocator hides small
# out-of-bounds accesses inside its blocks), only any4's kernels instrumented (kernel-name
# filter), a print limit and a capped log. No racecheck: the only shared memory is the per-lane
# table (no cross-lane sharing) and split-K synchronises through global memory.
#
# Without a GPU (or with GPU_CHECK_DRY_RUN=1) every stage after preflight is SKIPPED and the
# summary is still written: a dry run of this script (tests/test_gpu_check_script.py).
# Files under $OUT (at most 8): summary.txt, build.log, tests.log, sanitizer.log, bench.log,
# gemm_cuda_bench.json, gemm_cuda_bench.md. Exit status: 0 every stage passed, 1 a stage failed
# or was cut by the budget, 2 nothing could run (no GPU).
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
WORK=$(mktemp -d /tmp/any4_gpu_check.XXXXXX)
LOG_CAP=${LOG_CAP:-2000000} # bytes kept of each stage's output
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

note() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((T0 + BUDGET_S - $(date +%s))); }
# Keep the first $1 bytes of stdin, drain the rest (the writer never sees a broken pipe).
cap_stream() {
  head -c "$1"
  cat >/dev/null
}

# stage NAME LOG LIMIT_S COMMAND: runs COMMAND (a bash command line) under a timeout capped by
# the remaining budget, appends its capped output to $OUT/LOG and its verdict to the summary.
# Sets STAGE_OK=1 when it passed. Never aborts the script.
stage() {
  local name=$1 log=$2 limit=$3 cmd=$4 left s rc d verdict
  STAGE_OK=0
  left=$(remaining)
  if [ "$left" -le 15 ]; then
    note "$name: SKIPPED (time budget)"
    FAILED=1
    return 0
  fi
  if [ "$limit" -gt $((left - 10)) ]; then limit=$((left - 10)); fi
  s=$(date +%s)
  echo "===== $name (limit ${limit}s): $cmd" >>"$OUT/$log"
  timeout --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | cap_stream "$LOG_CAP" >>"$OUT/$log"
  rc=${PIPESTATUS[0]}
  d=$(($(date +%s) - s))
  verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMEOUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit $rc)"
  fi
  if [ "$verdict" = ok ]; then STAGE_OK=1; else FAILED=1; fi
  note "$name: $verdict (${d}s, log $log)"
  return 0
}

skip() {
  note "$1: SKIPPED ($2)"
  [ "${3:-}" = ok ] || FAILED=1
}

# ---------------------------------------------------------------- preflight
command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
{
  echo "date: $(date -u +%FT%TZ)  budget: ${BUDGET_S}s  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>/dev/null | head -2 || true
  command -v nvidia-smi >/dev/null || echo "nvidia-smi: not found"
  echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
  echo "cmake: $(cmake --version 2>&1 | head -1)"
  echo "compute-sanitizer: ${SANITIZER:-none} $([ -n "$SANITIZER" ] && "$SANITIZER" --version 2>&1 | tail -1)"
  $PY - <<'EOF' 2>&1
import importlib.util, os, sys, sysconfig
inc = os.path.join(sysconfig.get_paths()["include"], "Python.h")
mods = ["torch", "pybind11", "scikit_build_core", "pytest", "pytest_timeout", "ninja"]
have = {m: importlib.util.find_spec(m) is not None for m in mods}
print("python", sys.version.split()[0], "headers:", os.path.exists(inc), "modules:", have)
gpu, cap = 0, "90"
try:
    import torch
    if torch.cuda.is_available():
        gpu, (a, b) = 1, torch.cuda.get_device_capability()
        cap = f"{a}{b}"
    name = torch.cuda.get_device_name() if gpu else "no GPU"
    print("torch", torch.__version__, "cuda", torch.version.cuda, name)
except Exception as e:  # noqa: BLE001
    print("torch import failed:", repr(e))
print(f"preflight-vars gpu={gpu} cap={cap} timeout={int(have['pytest_timeout'])}")
EOF
} | tee "$WORK/preflight.txt" | grep -v "^preflight-vars" | tee -a "$SUMMARY"
pf_var() { sed -n "s/^preflight-vars.* $1=\\([^ ]*\\).*/\\1/p" "$WORK/preflight.txt" | head -1; }
HAVE_GPU=$(pf_var gpu)
HAVE_GPU=${HAVE_GPU:-0}
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && HAVE_GPU=0
CAP=$(pf_var cap)
CAP=${CAP:-90}
ARCH=${CUDA_ARCH:-${CAP}-real}
HAVE_TIMEOUT=$(pf_var timeout)
SAN_FILTER=""
if [ -n "$SANITIZER" ] && "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name"; then
  SAN_FILTER="--kernel-name kns=any4"
fi
note "preflight: ok ($(($(date +%s) - T0))s, gpu=$HAVE_GPU arch=$ARCH sanitizer=${SANITIZER:+yes} filter=${SAN_FILTER:+yes} pytest-timeout=$HAVE_TIMEOUT)"

PY_OK=0
if [ "$HAVE_GPU" != 1 ]; then
  for s in build selfcheck smoke memcheck tests bench-quick bench-full initcheck; do skip "$s" "no GPU"; done
else
  # -------------------------------------------------------------- build
  export ANY4_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  stage build build.log 240 "$PY -m pip install --no-build-isolation --no-deps -v \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES='$ARCH' \
    --config-settings=build-dir='$WORK/build' . && cd '$WORK' && \
    $PY -c 'import any4, sys; print(any4.build_info()); sys.exit(0 if any4.cuda_available() else 1)'"
  PY_OK=$STAGE_OK
  (cd "$WORK" && $PY -c "import any4; print('build_info', any4.build_info())" 2>&1 | tail -1 | tee -a "$SUMMARY")

  # -------------------------------------------------------------- fallback without Python
  if [ "$PY_OK" = 1 ]; then
    skip selfcheck "the Python build works" ok
  else
    stage selfcheck build.log 200 "nvcc -std=c++17 -O2 --expt-relaxed-constexpr -arch=sm_$CAP \
      -Icpp -Icuda -o '$WORK/gpu_selfcheck' bench/gpu_selfcheck.cpp cuda/*.cu cpp/pack_gpu.cpp \
      cpp/emulate_gpu.cpp cpp/pack.cpp cpp/parallel.cpp && '$WORK/gpu_selfcheck'"
    grep -E "^(ok |BAD|gpu_selfcheck)" "$OUT/build.log" | tail -12 | sed 's/^/selfcheck: /' | tee -a "$SUMMARY"
  fi
fi

if [ "$HAVE_GPU" = 1 ] && [ "$PY_OK" = 1 ]; then
  # -------------------------------------------------------------- smoke
  stage smoke tests.log 60 "$PY bench/gpu_sanitize_case.py --smoke"

  # -------------------------------------------------------------- memcheck
  SAN_OPTS="--error-exitcode 3 --print-limit 20 $SAN_FILTER"
  if [ -n "$SANITIZER" ]; then
    stage memcheck sanitizer.log 150 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool memcheck \
      --leak-check no $SAN_OPTS $PY bench/gpu_sanitize_case.py"
    grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -1 | sed 's/^/memcheck: /' | tee -a "$SUMMARY"
  else
    skip memcheck "compute-sanitizer not found"
  fi

  # -------------------------------------------------------------- GPU tests
  TIMEOUT_ARG=""
  [ "$HAVE_TIMEOUT" = 1 ] && TIMEOUT_ARG="--timeout 90"  # pytest-timeout loads itself
  stage tests tests.log 150 "$PY -m pytest -v -rfE -p no:cacheprovider -m gpu $TIMEOUT_ARG \
    tests/test_gemm_cuda.py tests/test_ops.py tests/test_nn.py"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/tests: /' | tee -a "$SUMMARY"

  # -------------------------------------------------------------- benchmarks
  INIT_RESERVE=$([ -n "$SANITIZER" ] && echo 80 || echo 0)
  stage bench-quick bench.log 75 "$PY bench/gemm_cuda_bench.py --out '$OUT' --quick --budget-s 55"
  FULL=$(($(remaining) - INIT_RESERVE - 40))
  if [ "$FULL" -ge 30 ]; then
    stage bench-full bench.log $((FULL + 30)) "$PY bench/gemm_cuda_bench.py --out '$OUT' --merge --budget-s $FULL"
  else
    skip bench-full "time budget"
  fi

  # -------------------------------------------------------------- initcheck
  if [ -n "$SANITIZER" ]; then
    stage initcheck sanitizer.log 75 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool initcheck \
      $SAN_OPTS $PY bench/gpu_sanitize_case.py --smoke"
    grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -1 | sed 's/^/initcheck: /' | tee -a "$SUMMARY"
  else
    skip initcheck "compute-sanitizer not found"
  fi
elif [ "$HAVE_GPU" = 1 ]; then
  for s in smoke memcheck tests bench-quick bench-full initcheck; do skip "$s" "no Python build"; done
fi

rm -rf "$WORK"
note "total: $(($(date +%s) - T0))s"
if [ -f "$OUT/gemm_cuda_bench.md" ]; then cat "$OUT/gemm_cuda_bench.md"; fi
echo "===== summary"
cat "$SUMMARY"
if [ "$HAVE_GPU" != 1 ]; then exit 2; fi
exit $FAILED
