// Tile sizes per head dim and kernel: the one place where they are chosen (benchmarks/NOTES.md says why).
#pragma once

namespace flash {

struct TileShape {
  int block_m;  // rows a thread block owns (split among its warps)
  int block_n;  // rows streamed per main-loop step
  int warps;
};

// Forward: owns query rows, streams keys.
constexpr TileShape fwd_tile(int head_dim) {
  return head_dim <= 64  ? TileShape{128, 128, 4}
       : head_dim <= 128 ? TileShape{128, 64, 4}
                         : TileShape{128, 64, 8};
}

// Backward dQ: owns query rows, streams keys; holds dQ, S and dP in registers.
constexpr TileShape bwd_dq_tile(int head_dim) { return TileShape{64, 64, 4}; }

// Backward dK/dV: owns key rows, streams queries; holds dK and dV in registers.
constexpr TileShape bwd_dkdv_tile(int head_dim) { return TileShape{64, 64, 4}; }

// dK/dV splits head dims above 128 into column halves (each thread block recomputes S and dP for its
// half) so that its two accumulators stay in registers.
constexpr int bwd_dkdv_column_splits(int head_dim) { return head_dim > 128 ? 2 : 1; }

}  // namespace flash
