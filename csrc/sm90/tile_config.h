// Tile sizes and schedule choices of the Hopper (SM90) forward per head dim: the one place they are
// chosen (benchmarks/NOTES.md says why). Every consumer warpgroup owns 64 query rows of the block.
#pragma once

namespace flash::sm90 {

struct FwdTile {
  int block_m;              // query rows per thread block: 64 per consumer warpgroup
  int block_n;              // key rows per main-loop step
  int stages;               // K and V buffers each in the shared-memory pipeline
  bool intra_wg_overlap;    // a warpgroup's softmax of block n overlaps its own Q·Kᵀ of n-1 and P·V of n+1
  bool pingpong;            // the two consumer warpgroups take turns at the tensor cores (named barriers)
  bool persistent = true;   // at most one block per SM, walking the tiles; else one block per tile
};

// 96 and 192 take their neighbours' tiles (128 and 256), not yet measured on their own.
constexpr FwdTile fwd_tile(int head_dim) {
  return head_dim <= 64    ? FwdTile{128, 128, 2, true, true}
         : head_dim <= 128 ? FwdTile{128, 128, 2, true, true}
                           : FwdTile{128, 64, 2, true, true};
}

}  // namespace flash::sm90
