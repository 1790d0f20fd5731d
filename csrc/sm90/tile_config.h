// Tile sizes and schedule choices of the Hopper (SM90) forward per head dim: the one place they are
// chosen (benchmarks/NOTES.md says why). Every consumer warpgroup owns 64 query rows of the block.
#pragma once

namespace flash::sm90 {

struct FwdTile {
  int block_m;              // query rows per thread block: 64 per consumer warpgroup
  int block_n;              // key rows per main-loop step
  int stages;               // K and V buffers each in the shared-memory pipeline
  bool intra_wg_overlap;    // a warpgroup's softmax of block n overlaps its own Q·Kᵀ of n-1 and P·V of n+1
  // The consumer warpgroups take turns at the tensor cores, round-robin (named barriers): two (block_m 128)
  // or three (block_m 192, whose consumers get 160 registers each, the producer 32).
  bool pingpong;
  bool persistent = true;   // at most one block per SM, walking the tiles; else one block per tile
  // Varlen calls without softcap, ALiBi, a left window edge or dropout run the common key loop (fwd_kernel.h:
  // Varlen without ScoreMod), else the general variant's. Off at D = 256 until timed: there that kernel
  // spills 28 bytes (windowed: 52, some in its masked steps) where the general one spills 8 (16) outside
  // its key loop, which is 2.6 times as long; the fixed-length kernel spills 16 (32), in its loop too.
  bool varlen_common_loop = true;
  // Of every 8 score columns a thread holds, how many take exp2 on the FMA units (a polynomial,
  // common/utils.h's exp2_fma) rather than the special-function unit, whose 16 results per SM and clock bound
  // D = 64 (benchmarks/NOTES.md). Unmasked key blocks of the overlapped loop (intra_wg_overlap) only, whose
  // exponents are finite. Measured slower at D = 64 (2 and 3 of 8: 7% and 11% at S = 8k, session 9): 0.
  int exp2_fma_of8 = 0;
};

// 96 and 192 take their neighbours' tiles (128 and 256), not yet swept on their own (no spills in either).
// full_rows: the tile of fixed-length calls in which every query row sees every key (no causal, no window:
// the kernel's Windowed flag off). At D = 64 three consumer warpgroups with ping-pong among them ran 10%
// faster there at S = 8k (444 against 404 TFLOP/s, 5% at 2k, 2% slower at 512), but slower with causal
// masks, where their 160 registers spill in the masked steps (benchmarks/NOTES.md, session 9's sweep).
constexpr FwdTile fwd_tile(int head_dim, bool full_rows = false) {
  return head_dim <= 64    ? (full_rows ? FwdTile{192, 128, 2, true, true} : FwdTile{128, 128, 2, true, true})
         : head_dim <= 128 ? FwdTile{128, 128, 2, true, true}
                           : FwdTile{128, 64, 2, true, true, true, false};
}

}  // namespace flash::sm90

namespace flash::sm90 {

// The Hopper dK/dV kernel's tile per head dim (sm90/bwd_dkdv_kernel.h), for head dims up to 128: each consumer warpgroup owns 64 key
// rows of the block and holds their dK and dV in registers (kHeadDim / 2 fp32 each per thread) beside the
// (64, block_m) tiles Sᵀ and dPᵀ; block_m = 64 keeps D = 128 within the 240 registers a consumer may take.
struct BwdTile {
  int block_m;  // query rows per main-loop step
  int block_n;  // key rows per thread block: 64 per consumer warpgroup
  int stages;   // (Q, dO) buffers in the shared-memory pipeline
  // Where the gradient product of step n (dK += dSᵀ·Q; the dQ kernel's dQ += dS·K) is issued, dS kept in
  // registers until it has run and its stage released then (a step late: best with a third stage).
  // 0: in step n, waited on there. 1: in step n + 1 between its S and dP, so that it runs beside that step's
  // exponentials. 2: first in step n + 1, before S: the tensor cores do not drain between steps, and dS dies
  // at S's wait (fewer registers than 1).
  int overlap = 0;
  // The dK/dV kernel only: its queries' LSE and D read from global memory (L2) a step ahead, into block_m / 2
  // more registers, rather than LSE while Sᵀ's product runs and D once Pᵀ is made, where their latency may
  // show.
  bool prefetch_rows = false;
  // The dK/dV kernel only: K's and V's GMMA descriptors (the A operands of Sᵀ and dPᵀ) rebuilt in every step
  // rather than hoisted out of the loop, where at D = 128 they overflowed the uniform registers and spilled
  // (40/48 bytes; 0 rebuilt).
  bool desc_per_step = false;
};

// Measured in session 9's sweep (benchmarks/NOTES.md): at D = 128 the descriptors rebuilt per step (no
// spill) gave 4-7% at S >= 4k without causal; at D = 64 a third stage with dK's product a step late and the
// rows prefetched gave 5-10% but at S = 16k without causal (-1.5%).
constexpr BwdTile bwd_dkdv_tile(int head_dim) {
  return head_dim <= 64 ? BwdTile{64, 128, 3, 1, true, false} : BwdTile{64, 128, 2, 0, false, true};
}

// The Hopper dQ kernel's tile (sm90/bwd_dq_kernel.h): each consumer warpgroup owns 64 query rows and holds
// their dQ (kHeadDim / 2 fp32 per thread) beside the (64, block_n) tiles S and dP; here block_m is the query
// rows per thread block (64 per warpgroup), block_n the keys per step and stages the (K, V) buffers. At
// D = 128, Q, dO and two stages of K, V take 128 KB; a third stage with dQ's product a step late
// (overlap 1) ran 8-13% slower at D = 128 (session 9).
constexpr BwdTile bwd_dq_tile(int head_dim) { return BwdTile{128, 64, 2}; }

}  // namespace flash::sm90
