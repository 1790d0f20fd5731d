#!/usr/bin/env bash
# Every benchmark, in about 5-8 minutes on an H100: bench.py (fwd, bwd, fwd+bwd; bf16 and fp16) and its
# plots, the per-kernel timings, peak memory against seqlen, and GPT training steps. Each writes its
# markdown (and JSON, PNGs, log) to $OUT, else ./bench_out/; a short summary comes last.
#   bash benchmarks/run_all.sh            (the extension must be built: run_gpu.sh builds it)
# Env: REPS, timed calls per point in bench.py and bench_kernels.py (default 10).
# Each step runs under a time limit (below) so that the whole stays under 10 minutes; bench.py saves
# what it has after each (dtype, head dim), so a step cut short still leaves results.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-bench_out}"
REPS="${REPS:-10}"
export PYTHONUNBUFFERED=1

if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU: nothing to benchmark"
  exit 0
fi
mkdir -p "$DIR"

declare -A result
step() {  # step NAME SECONDS COMMAND...: COMMAND with a time limit, its output in $DIR/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result[$name]="ok" ;;
    124) result[$name]="CUT SHORT at the $limit s limit" ;;
    *) result[$name]="FAILED with exit code $rc: $(tail -1 "$DIR/$name.log")" ;;
  esac
  result[$name]+=" in $((SECONDS - start)) s (log: $DIR/$name.log)"
  echo "   ${result[$name]}"
}

step bench 240 python3 benchmarks/bench.py --reps "$REPS" --warmup 2 --json "$DIR/bench.json" \
  --markdown "$DIR/bench.md"
step plots 30 python3 benchmarks/plots.py "$DIR/bench.json"
step kernels 60 python3 benchmarks/bench_kernels.py --reps "$REPS" --json "$DIR/kernels.json" \
  --markdown "$DIR/kernels.md"
step memory 60 python3 benchmarks/bench_memory.py --json "$DIR/memory.json" --markdown "$DIR/memory.md" \
  --plot "$DIR/memory.png"
step gpt 150 python3 benchmarks/bench_gpt.py --json "$DIR/gpt.json" --markdown "$DIR/gpt.md"

echo
echo "=== summary: $(python3 -c 'import torch; print(torch.cuda.get_device_name())'), outputs in $DIR ==="
for name in bench plots kernels memory gpt; do echo "$name: ${result[$name]}"; done
echo
[ -f "$DIR/bench.md" ] && sed -n '/^Geometric means of ours/,$p' "$DIR/bench.md"
[ -f "$DIR/kernels.md" ] && grep '^Backward overhead' "$DIR/kernels.md"
echo "plots: $(grep -h '\.png$' "$DIR/plots.log" "$DIR/memory.log" 2>/dev/null | tr '\n' ' ')"
echo
if [ -f "$DIR/memory.md" ]; then
  echo "Memory, peak/S at the largest S over its smallest:"
  grep '^- ' "$DIR/memory.md"
  echo
fi
[ -f "$DIR/gpt.md" ] && sed -n '/^| T /,$p' "$DIR/gpt.md"
exit 0
