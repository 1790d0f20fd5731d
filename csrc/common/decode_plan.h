// How a decoding call over a KV cache is laid out on the GPU: whether GQA query heads are packed into one
// block's rows, and how many splits of the keys (flash-decoding) the grid takes when num_splits = 0. Plain
// host C++ (no CUDA, no torch), so that tests/test_decode_plan.py compiles it with the host compiler alone
// and pins its decisions; flash_api.cpp is its one caller in the extension.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flash {

// Decoding with GQA (heads > heads_kv) packs each kv head's query heads into the rows of one block, so that K
// and V are read once per kv head (flash_api.cpp pack_gqa_decode does the re-view). Only where no score
// depends on the query's position or head beyond that (the kernel takes the packed rows for queries 0 ..
// groups - 1): one query (causal is then a no-op), no window's left edge (window_left: set_scores's, where
// seqlen_k or more cuts nothing), no ALiBi (slopes per query head).
constexpr bool packs_gqa_decode(int64_t seqlen_q, int64_t heads, int64_t heads_kv, bool alibi, int64_t window_left,
                                int64_t seqlen_k) {
  return seqlen_q == 1 && heads > heads_kv && !alibi && window_left >= seqlen_k;
}

// A decoding grid before it is split: `work` blocks (batch x heads x query blocks, heads_kv of them when
// packed), each streaming `key_blocks` key blocks of block_n rows (the cache's capacity: the lengths are on
// the device), `rows` query rows in all (batch x heads x seqlen_q, packed), `slots` blocks resident on the
// GPU at once (SMs x blocks an SM holds).
struct DecodeGrid {
  int64_t work;
  int64_t key_blocks;
  int64_t rows;
  int head_dim;
  int block_n;
  int64_t slots;
  // Whether a split launch folds the combine into its last block per tile (FLASH_ATTN2_DECODE_FUSED_COMBINE=1,
  // split_combine.h combine_in_last_split): no second launch, so the cost model prices splitting lower.
  bool fused_combine;
};

// Blocks of the decoding kernel an SM holds at once: its 128 threads take up to 255 registers (ptxas, bf16:
// D = 128 214-255 over the four variants, sm_80 and sm_90a; D = 64 255 in all four, sm_80; D = 256 spills),
// so two fit the 64K registers of an SM (their 48 KB of shared memory would allow four). A constant: the
// count must be known where the scratch is allocated, before the launch header that knows the kernel.
constexpr int kDecodeBlocksPerSm = 2;

constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The fused combine counts each tile's splits in an int32 buffer of this many counts (flash_api.cpp, one per
// device and stream, 256 KB); a grid of more tiles (batch x heads x query blocks; 64k is, e.g., batch 256 x 256
// heads) takes the combine kernel.
constexpr int64_t kMaxFusedCombineTiles = int64_t(1) << 16;

// The grid of a launch (after packing: heads is heads_kv and seqlen_q the group size where it packed) on
// tiles of block_m query rows and block_n keys, on a GPU of `sms` SMs; fused_combine: asked for (and the
// kernel variant built: flash_api.cpp), taken where the counts fit.
constexpr DecodeGrid decode_grid(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int head_dim,
                                 int block_m, int block_n, int sms, bool fused_combine = false) {
  int64_t const work = batch * heads * ceil_div64(seqlen_q, block_m);
  return DecodeGrid{work, ceil_div64(seqlen_k, block_n), batch * heads * seqlen_q, head_dim, block_n,
                    int64_t(sms) * kDecodeBlocksPerSm, fused_combine && work <= kMaxFusedCombineTiles};
}

// The cost model behind num_splits = 0, in steps: one step is the time a full wave of resident blocks takes to
// stream one key block each (K and V, 2 x block_n x head_dim x 2 bytes; at D = 128 on an H200, 264 blocks x
// 32 KB at ~4.3 TB/s, about 2 us). Decoding is memory-bound and a block's loads are latency-bound (one K or V
// tile in flight), so the GPU streams at full rate only when every slot holds a block, and a partial last
// wave takes as long as a full one. With S splits the grid is work x S blocks, each ceil(key_blocks / S)
// key blocks long:
//   cost(S) = waves(S) x (ceil(key_blocks / S) + kBlockSteps) + [S > 1] (kCombineSteps + partials(S))
//   waves(S) = ceil(work x S / slots)
// kBlockSteps: what a block costs beside its key blocks (start, the Q tile's load, the first K tile's
// latency that nothing hides, the output's store), about one step each. kCombineSteps: the combine kernel, a
// second launch that waits for the first to drain (~2 us under a CUDA graph) and its own ramp. partials(S):
// the fp32 partial outputs each split writes and the combine reads (2 x S x rows x head_dim x 4 bytes), in
// steps (a step streams slots x 2 x block_n x head_dim x 2 bytes). A split must also stream at least
// kMinSplitBytes of K and V, so that an error in those constants cannot pick splits whose fixed costs
// dominate them (at D = 128: 8 key blocks, 512 keys). The fewest splits whose cost is within kTolerance of
// the cheapest count win: the model prices splitting only roughly, so a split must save more than that (a
// grid of 1.94 waves, batch 64 GQA at 128k, would otherwise take 17 splits to save 1%). The counts whose
// last splits would get no key block are never taken (ceil(key_blocks / S) blocks each: S' = ceil(key_blocks
// / ceil(key_blocks / S)) launches the same work with no empty blocks).
// With the combine fused (fused_combine): kCombineSteps becomes kFusedCombineSteps, the last block's own
// combine (its threads' chains of num_splits dependent L2 reads, about as long as the combine kernel's, but
// no launch and no drain between the two), and kMinSplitBytes halves, so that GQA batch 1 at 8k may take 32
// splits of 4 key blocks (one wave of 256 blocks; benchmarks/NOTES.md has the arithmetic). Unmeasured: only
// behind the switch.
constexpr int kMaxSplits = 128;
constexpr double kBlockSteps = 2.0, kCombineSteps = 2.0, kFusedCombineSteps = 1.0, kTolerance = 0.05;
constexpr int64_t kMinSplitBytes = 256 << 10, kFusedMinSplitBytes = 128 << 10;

// The most splits num_splits can ask for: one key block each, at most kMaxSplits (and 1 for an empty cache).
constexpr int64_t most_splits(DecodeGrid const &g) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, g.key_blocks));
}

// The fewest key blocks a split of the heuristic's streams.
constexpr int64_t min_split_key_blocks(DecodeGrid const &g) {
  int64_t const key_block_bytes = 2 * int64_t(g.block_n) * g.head_dim * 2;
  int64_t const min_bytes = g.fused_combine ? kFusedMinSplitBytes : kMinSplitBytes;
  return std::max<int64_t>(1, ceil_div64(min_bytes, key_block_bytes));
}

constexpr double split_cost(DecodeGrid const &g, int64_t splits) {
  int64_t const waves = ceil_div64(std::max<int64_t>(g.work, 1) * splits, std::max<int64_t>(g.slots, 1));
  double cost = double(waves) * (double(ceil_div64(g.key_blocks, splits)) + kBlockSteps);
  if (splits > 1) {
    double const step_bytes = double(std::max<int64_t>(g.slots, 1)) * 2.0 * g.block_n * g.head_dim * 2.0;
    cost += (g.fused_combine ? kFusedCombineSteps : kCombineSteps) + 2.0 * double(splits) * double(g.rows) * g.head_dim * 4.0 / step_bytes;
  }
  return cost;
}

// The split count a launch takes: `requested` (> 0) clamped to most_splits, else (0) the cost model's.
constexpr int decode_num_splits(DecodeGrid const &g, int64_t requested) {
  if (requested > 0) { return int(std::min(requested, most_splits(g))); }
  int64_t const limit = std::min(most_splits(g), std::max<int64_t>(1, g.key_blocks / min_split_key_blocks(g)));
  auto const full = [&](int64_t s) { return ceil_div64(g.key_blocks, ceil_div64(g.key_blocks, s)) == s; };
  double cheapest = split_cost(g, 1);
  for (int64_t s = 2; s <= limit; ++s) {
    if (full(s)) { cheapest = std::min(cheapest, split_cost(g, s)); }
  }
  for (int64_t s = 1; s < limit; ++s) {
    if (full(s) && split_cost(g, s) <= cheapest * (1 + kTolerance)) { return int(s); }
  }
  return int(limit);
}

}  // namespace flash
