#!/usr/bin/env bash
# On a GPU machine: build, run the GPU tests and the benchmarks (fwd, bwd, fwd+bwd), print one summary.
#   bash benchmarks/run_gpu.sh            (logs go to $OUT, else ./gpu_run/)
# Env: FLASH_ATTN2_HEAD_DIMS / FLASH_ATTN2_CUDA_ARCHS as for the build; PYTEST_ARGS for extra pytest flags;
#      SKIP_BUILD=1 to reuse a build; BENCH_ARGS for benchmarks/bench.py (e.g. --passes bwd).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_run}"
mkdir -p "$LOG"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1

# A GPU machine without a registry: take nvidia-cutlass from a carried wheel if there is one.
if ! python3 -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvidia_cutlass-*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

build="skipped"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$SECONDS
  if python3 -m pip install --no-build-isolation --no-deps -e . >"$LOG/build.log" 2>&1; then
    build="ok in $((SECONDS - start)) s with MAX_JOBS=$MAX_JOBS"
  else
    build="FAILED (see build.log)"; tail -30 "$LOG/build.log"
  fi
fi

python3 -m pytest tests ${PYTEST_ARGS:--q} 2>&1 | tee "$LOG/tests.log" | tail -25
tests=$(grep -E "passed|failed|error" "$LOG/tests.log" | tail -1)

python3 benchmarks/bench.py --json "$LOG/bench.json" --markdown "$LOG/bench.md" ${BENCH_ARGS:-} \
  2>&1 | tee "$LOG/bench.log"

echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)) ==="
echo "build: $build"
echo "tests: $tests"
echo "bench (ours/flash):"
grep "^Geometric mean" "$LOG/bench.log" | sed 's/^/  /' || echo "  no result (see bench.log)"
