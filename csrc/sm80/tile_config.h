// Tile sizes per head dim and kernel: the one place where they are chosen (benchmarks/NOTES.md says why).
#pragma once

namespace flash {

struct TileShape {
  int block_m;      // rows a thread block owns (split among its warps)
  int block_n;      // rows streamed per main-loop step
  int warps;
  int warps_n = 1;  // warps side by side along each matmul's N (columns); the rest stack along M (rows)
};

// Forward: owns query rows, streams keys.
constexpr TileShape fwd_tile(int head_dim) {
  return head_dim <= 64  ? TileShape{128, 128, 4}
       : head_dim <= 128 ? TileShape{128, 64, 4}
                         : TileShape{128, 64, 8};
}

// Forward over a KV cache (flash_attn_with_kvcache): decoding has a few query rows and many keys, so the
// block owns fewer rows than the forward's (one 16-row MMA tile per warp) and more blocks fit an SM, each
// streaming its split of the keys. A first choice, not yet measured (benchmarks/bench_decode.py).
constexpr TileShape fwd_kvcache_tile(int head_dim) {
  return head_dim <= 64 ? TileShape{64, 128, 4} : TileShape{64, 64, 4};
}

// Backward dQ: owns query rows, streams keys; holds dQ, S and dP in registers.
constexpr TileShape bwd_dq_tile(int head_dim) { return TileShape{64, 64, 4}; }

// Backward dK/dV: owns key rows, streams queries; holds dK and dV in registers. Above head dim 128 the
// two accumulators outgrow four warps' registers: eight warps split their columns in four, and share
// Sᵀ and dPᵀ (each warp computes a quarter) through shared memory.
constexpr TileShape bwd_dkdv_tile(int head_dim) {
  return head_dim <= 128 ? TileShape{64, 64, 4} : TileShape{64, 64, 8, 4};
}

// Backward dK/dV with the atomic dQ (deterministic=False): a dQ tile (kBlockN, head_dim) joins dK and dV
// in registers while it is summed. Above head dim 64 that outgrows four warps (D = 128 spilled ~870 bytes
// for sm_90a): eight warps split the columns in two, as FlashAttention-2's own kernel does.
constexpr TileShape bwd_dkdv_atomic_tile(int head_dim) {
  return head_dim <= 64 ? TileShape{64, 64, 4} : head_dim <= 128 ? TileShape{64, 64, 8, 2} : TileShape{64, 64, 8, 4};
}

}  // namespace flash
