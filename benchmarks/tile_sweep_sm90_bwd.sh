#!/usr/bin/env bash
# Hopper-backward candidates, each built as its own binary (in parallel) and timed on the GPU:
#   bash benchmarks/tile_sweep_sm90_bwd.sh "dkdv:128:64x128:2:0 dkdv:128:64x128:3:2:0:1 dq:64:128x64:3:1 ..."
#   (kernel:hdim:block_m x block_n:stages:overlap[:prefetch_rows[:desc_per_step]], the last two dkdv only, 0 if
#   left out; kernel is dq, dkdv or dkdv_atomic (dK/dV with the atomic dQ, checked against the split backward's
#   results; opt-in and unverified on a GPU); tile_config.h's BwdTile says what each does; the fields of BwdDqTraits and
#   BwdDkdvTraits in csrc/sm90/bwd_kernel_traits.h: for dQ block_m is the queries per block and block_n the keys
#   per step, for dK/dV block_m the queries per step and block_n the keys per block)
# Each candidate's line shows ptxas's registers (the launch-bound figure: setmaxnreg gives the consumers more),
# its worst spill, and whether ptxas serialized wgmma (a register hazard it could not rule out: slow); each
# timing line a hash of the gradients, which candidates of one kernel, head dim and tile must share.
# Needs nvcc and the CUTLASS headers (CUTLASS_INCLUDE, else found as the build finds them).
# SWEEP_COMPILE_ONLY=1 builds and reports the candidates without running them (CI: tests/test_sweeps_build.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# Default: the knobs against today's tiles (the first of each kernel and head dim is tile_config.h's choice).
candidates=${1:-"dkdv:128:64x128:2:0 dkdv:128:64x128:2:0:0:1 dkdv:128:64x128:3:2:0:1 dkdv:64:64x128:2:0 dkdv:64:64x128:3:1 dkdv:64:64x128:3:1:1 dq:128:128x64:2:0 dq:128:128x64:3:1"}
include=${CUTLASS_INCLUDE:-$(cd csrc && python3 -c "import build_config; print(build_config.cutlass_include())")}
dir=$(mktemp -d)
status=0  # 1 if a candidate did not build
for c in $candidates; do
  IFS=':x' read -r kernel d m n stages overlap prefetch desc <<<"$c"
  case $kernel in dq) id=0 ;; dkdv) id=1 ;; dkdv_atomic) id=2 ;; *) echo "unknown kernel in $c"; exit 1 ;; esac
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -I"$include" \
    -DKERNEL=$id -DHDIM="$d" -DBLOCK_M="$m" -DBLOCK_N="$n" -DSTAGES="$stages" -DOVERLAP="$overlap" \
    -DPREFETCH_ROWS="${prefetch:-0}" -DDESC_PER_STEP="${desc:-0}" \
    -Xptxas -v benchmarks/tile_sweep_sm90_bwd.cu -o "$dir/$c" >"$dir/$c.log" 2>&1 &
done
wait
for c in $candidates; do
  if [ -x "$dir/$c" ]; then
    regs=$(grep -o "Used [0-9]* registers" "$dir/$c.log" | sort -k2 -n | tail -1)
    spill=$(grep -o "[0-9]* bytes spill stores" "$dir/$c.log" | sort -n | tail -1)
    serial=$(grep -c "serialized" "$dir/$c.log" || true)
    echo "== $c ($regs, worst spill: $spill; wgmma-serialization warnings: $serial)"
    [ "${SWEEP_COMPILE_ONLY:-0}" = 1 ] || "$dir/$c" || echo "== $c: run failed"
  else
    echo "== $c: build failed: $(grep -m1 error "$dir/$c.log")"
    status=1
  fi
done
exit $status
