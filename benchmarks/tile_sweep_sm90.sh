#!/usr/bin/env bash
# Hopper-forward candidates, each built as its own binary (in parallel) and timed on the GPU:
#   bash benchmarks/tile_sweep_sm90.sh "128:128x128:2:1:1:1 128:128x176:2:1:1:1 ..."
#   (hdim:block_m x block_n:stages:intra-warpgroup overlap:ping-pong:persistent[:exp2 on FMA, of 8 columns])
#   block_m 192: three consumer warpgroups (ping-pong round-robin among them when ping-pong is 1).
# Needs nvcc and the CUTLASS headers (CUTLASS_INCLUDE, else found as the build finds them).
# SWEEP_COMPILE_ONLY=1 builds and reports the candidates without running them (CI: tests/test_sweeps_build.py).
set -euo pipefail
cd "$(dirname "$0")/.."
candidates=${1:-"128:128x128:2:1:1:1 128:128x128:2:1:0:1 128:128x128:2:0:1:1 128:128x128:2:1:1:0"}
include=${CUTLASS_INCLUDE:-$(cd csrc && python3 -c "import build_config; print(build_config.cutlass_include())")}
dir=$(mktemp -d)
status=0  # 1 if a candidate did not build
for c in $candidates; do
  IFS=':x' read -r d m n stages overlap pingpong persistent exp2 <<<"$c"
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -I"$include" \
    -DHDIM="$d" -DBLOCK_M="$m" -DBLOCK_N="$n" -DSTAGES="$stages" -DOVERLAP="$overlap" -DPINGPONG="$pingpong" -DPERSISTENT="$persistent" -DEXP2_FMA="${exp2:-0}" \
    -Xptxas -v benchmarks/tile_sweep_sm90.cu -o "$dir/$c" >"$dir/$c.log" 2>&1 &
done
wait
for c in $candidates; do
  if [ -x "$dir/$c" ]; then
    # ptxas's lines for the candidate's kernels only (the binary holds the default one too, as the reference).
    IFS=':x' read -r d m n stages overlap pingpong persistent exp2 <<<"$c"
    mine="FwdTraitsILi${d}EN7cutlass10bfloat16_tELi${m}ELi${n}ELi${stages}ELb${overlap}ELb${pingpong}ELb${persistent}ELi${exp2:-0}E"
    usage=$(awk -v k="$mine" '/Function properties for/ { on = index($0, k) > 0 } on' "$dir/$c.log")
    echo "== $c (registers: $(grep -o "Used [0-9]* registers" <<<"$usage" | sort -u | tr '\n' ' ')worst spill: $(grep -o "[0-9]* bytes spill stores" <<<"$usage" | sort -n | tail -1))"
    [ "${SWEEP_COMPILE_ONLY:-0}" = 1 ] || "$dir/$c"
  else
    echo "== $c: build failed: $(grep -m1 error "$dir/$c.log")"
    status=1
  fi
done
exit $status
