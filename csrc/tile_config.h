// Tile sizes per head dim: the one place where they are chosen (see benchmarks/NOTES.md for why).
#pragma once

namespace flash {

struct TileShape {
  int block_m;  // query rows per thread block
  int block_n;  // key rows per main-loop step
  int warps;    // warps split the query rows; each owns block_m / warps of them
};

constexpr TileShape fwd_tile(int head_dim) {
  return head_dim <= 64  ? TileShape{128, 128, 4}
       : head_dim <= 128 ? TileShape{128, 64, 4}
                         : TileShape{128, 64, 8};
}

}  // namespace flash
