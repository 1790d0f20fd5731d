#!/usr/bin/env bash
# Tile candidates, each built as its own binary (in parallel) and timed on the GPU:
#   bash benchmarks/tile_sweep.sh "fwd:128:128x64x4 dq:128:64x64x4 dkdv:128:64x64x4 ..."
#   (kernel:hdim:block_m x block_n x warps[x warps_n]; kernel is fwd, dq, dkdv or dkdv_atomic; warps_n: warps side by
#   side along the columns, 1 if left out)
# Needs nvcc and the CUTLASS headers (CUTLASS_INCLUDE, else found as the build finds them).
# SWEEP_COMPILE_ONLY=1 builds and reports the candidates without running them (CI: tests/test_sweeps_build.py).
set -euo pipefail
cd "$(dirname "$0")/.."
candidates=${1:-"fwd:64:128x128x4 fwd:64:128x64x4 fwd:128:128x64x4 fwd:128:128x128x8 fwd:128:64x64x4"}
include=${CUTLASS_INCLUDE:-$(cd csrc && python3 -c "import build_config; print(build_config.cutlass_include())")}
dir=$(mktemp -d)
status=0  # 1 if a candidate did not build
for c in $candidates; do
  IFS=':x' read -r kernel d m n w wn <<<"$c"
  case $kernel in fwd) id=0 ;; dq) id=1 ;; dkdv) id=2 ;; dkdv_atomic) id=3 ;; *) echo "unknown kernel in $c"; exit 1 ;; esac
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -Icsrc -I"$include" \
    -DKERNEL=$id -DHDIM="$d" -DBLOCK_M="$m" -DBLOCK_N="$n" -DWARPS="$w" -DWARPS_N="${wn:-1}" -Xptxas -v benchmarks/tile_sweep.cu -o "$dir/$c" \
    >"$dir/$c.log" 2>&1 &
done
wait
for c in $candidates; do
  if [ -x "$dir/$c" ]; then
    echo "== $c (worst: $(grep -o "[0-9]* bytes spill stores" "$dir/$c.log" | sort -n | tail -1))"
    [ "${SWEEP_COMPILE_ONLY:-0}" = 1 ] || "$dir/$c"
  else
    echo "== $c: build failed: $(grep -m1 error "$dir/$c.log")"
    status=1
  fi
done
exit $status
