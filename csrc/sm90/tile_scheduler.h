// The Hopper forward's persistent scheduler: a grid of at most one thread block per SM walks the tiles
// t = blockIdx.x, blockIdx.x + gridDim.x, ..., so that a block's next tile loads while its last one
// finishes. Tiles of one (batch, head) are consecutive, so that the blocks running at once share their K
// and V in L2; within one, the query blocks with the most keys come first (causal: long tiles start early).
#pragma once

#include <cute/tensor.hpp>

#include "common/flash.h"

#include "fwd_mainloop.h"

namespace flash::sm90 {

// Persistent false: one block per tile, the hardware handing out the tiles in the same order.
template <int kBlockM, bool kPersistent>
struct TileScheduler {
  int m_blocks, heads, num_tiles;

  CUTE_HOST_DEVICE explicit TileScheduler(FwdParams const &p)
      : m_blocks(cute::ceil_div(p.seqlen_q, kBlockM)), heads(p.heads), num_tiles(m_blocks * p.heads * p.batch) {}

  // One block per SM at most: the kernel's shared memory admits no second one.
  static int grid(FwdParams const &p, int sm_count) {
    int const tiles = TileScheduler(p).num_tiles;
    return kPersistent ? std::min(tiles, sm_count) : tiles;
  }

  CUTE_DEVICE int first() const { return blockIdx.x; }
  CUTE_DEVICE int next(int tile) const { return tile + gridDim.x; }
  CUTE_DEVICE bool valid(int tile) const { return tile < num_tiles; }

  // The tile's query block and (head, batch); the key range is the mask's to say.
  CUTE_DEVICE BlockWork work(int tile) const {
    int const batch_head = tile / m_blocks;
    return BlockWork{m_blocks - 1 - tile % m_blocks, batch_head % heads, batch_head / heads, 0, 0};
  }
};

}  // namespace flash::sm90
