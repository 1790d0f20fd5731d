#!/usr/bin/env bash
# compute-sanitizer over tests/sanitize_workload.py: memcheck, racecheck, synccheck and initcheck, each in
# its own process; prints one line per tool with its error count, then the total. Exits 1 if any tool
# found errors or gave no summary.
#   bash tests/run_sanitizer.sh [workload args, e.g. --dtypes fp16 --head-dims 64 128, --varlen-only, or
#   --deterministic: the split backward, not the atomic one the workload opts into]
# Env: COMPUTE_SANITIZER (its path; default: on PATH, else $CUDA_HOME/bin), TOOLS (a subset of the four),
#      SANITIZER_ARGS (more flags for every tool, e.g. "--kernel-name kns=flash" to check only our kernels).
# Full logs go to $OUT/sanitizer, else ./sanitizer_logs.
set -uo pipefail
cd "$(dirname "$0")/.."

sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
if [ ! -x "$sanitizer" ]; then
  echo "compute-sanitizer not found at $sanitizer (set COMPUTE_SANITIZER)"; exit 2
fi
log="${OUT:+$OUT/sanitizer}"; log="${log:-sanitizer_logs}"
mkdir -p "$log"
# Without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past
# a tensor's end instead of landing in a neighbour inside one cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1

total=0
status=0
for tool in ${TOOLS:-memcheck racecheck synccheck initcheck}; do
  start=$SECONDS
  # shellcheck disable=SC2086  # SANITIZER_ARGS is a list of flags
  "$sanitizer" --tool "$tool" ${SANITIZER_ARGS:-} python3 tests/sanitize_workload.py --no-check "$@" \
    >"$log/$tool.log" 2>&1
  rc=$?
  # racecheck prints "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)" instead
  errors=$(grep -Eo "(ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: .*\([0-9]+ error)" "$log/$tool.log" | tail -1 |
           grep -Eo "[0-9]+ error" | grep -Eo "[0-9]+")
  detail=$(grep -E "RACECHECK SUMMARY" "$log/$tool.log" | tail -1 | sed 's/^========= //')
  if [ -z "$errors" ]; then
    printf "%-10s no ERROR SUMMARY (exit %s, %d s): see %s\n" "$tool" "$rc" $((SECONDS - start)) "$log/$tool.log"
    tail -5 "$log/$tool.log" | sed 's/^/    /'
    status=1
    continue
  fi
  total=$((total + errors))
  [ "$errors" -eq 0 ] && [ "$rc" -eq 0 ] || status=1
  printf "%-10s %s errors (exit %s, %d s)%s\n" "$tool" "$errors" "$rc" $((SECONDS - start)) "${detail:+; $detail}"
done
echo "total      $total errors (logs in $log)"
exit $status
