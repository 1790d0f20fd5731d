// Writing results: an fp32 accumulator tile goes to global memory through shared memory, so that the
// global stores are 16 bytes wide and coalesced (per-row statistics: store_row_values, common/utils.h).
#pragma once

#include <cute/tensor.hpp>

#include "common/block_info.h"
#include "common/flash.h"
#include "common/utils.h"

#include "tile_copy.h"

namespace flash {

using namespace cute;

// Stores acc (partitioned by tiled_mma over a (rows, cols) tile) to gOut, converted to Element.
// sBuf: a shared-memory tile of that shape that no warp reads any more. Rows at or past max_row and
// columns at or past head_dim are not written.
template <class Traits, class TiledMma, class Acc, class SmemTile, class GmemTile>
CUTE_DEVICE void store_acc_tile(TiledMma const &tiled_mma, Acc const &acc, SmemTile &sBuf, GmemTile &gOut,
                                int max_row, int head_dim) {
  using Element = typename Traits::Element;
  int const tid = threadIdx.x;
  Tensor rOut = convert_type<Element>(acc);

  auto smem_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomAcc{}, tiled_mma);
  auto smem_thr_copy = smem_copy.get_thread_slice(tid);
  Tensor taccRr = smem_thr_copy.retile_S(rOut);  // ((Atom,AtomNum), MMA_M, MMA_N)
  Tensor taccRs = smem_thr_copy.partition_D(sBuf);
  __syncthreads();  // sBuf may alias a buffer another warp was still reading
  copy(smem_copy, taccRr, taccRs);
  __syncthreads();

  typename Traits::template GmemTiledCopyStore<decltype(size<1>(gOut))::value> gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(tid);
  Tensor tRs = gmem_thr_copy.partition_S(sBuf);  // (CPY, CPY_M, CPY_K)
  Tensor tRg = gmem_thr_copy.partition_D(gOut);
  Tensor tRc = gmem_thr_copy.partition_D(make_identity_tensor(make_shape(size<0>(gOut), size<1>(gOut))));
  Tensor tRr = make_tensor<Element>(shape(tRg));
  copy(gmem_copy, tRs, tRr);
  store_tile(gmem_copy, tRr, tRg, tRc, max_row, head_dim);
}

// Split-KV: one split's O (fp32, normalised over this split's keys only) and LSE into the (num_splits, batch,
// heads, seqlen_q, ...) scratch that the combine kernel merges (common/split_combine.h). Straight from the
// accumulator, with no staging through shared memory: a decoding block holds few valid rows.
template <class Traits, class TiledMma, class Acc, class RowValues>
CUTE_DEVICE void store_split_partial(FwdParams const &p, TiledMma const &tiled_mma, Acc const &acc_o,
                                     RowValues const &lse, int split, BlockInfo const &seq, int head, int m_block) {
  using TileO = Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>;
  index_t const row0 = ((index_t(split) * p.batch + seq.batch) * p.heads + head) * p.seqlen_q;
  Tensor mO = make_tensor(make_gmem_ptr(p.o_partial + row0 * p.head_dim),
                          make_shape(p.seqlen_q, Int<Traits::kHeadDim>{}), make_stride(index_t(p.head_dim), _1{}));
  Tensor gO = local_tile(mO, TileO{}, make_coord(m_block, 0));  // (kBlockM, kHeadDim)
  Tensor mLSE = make_tensor(make_gmem_ptr(p.lse_partial + row0), make_shape(p.seqlen_q));
  Tensor gLSE = local_tile(mLSE, Shape<Int<Traits::kBlockM>>{}, make_coord(m_block));  // (kBlockM)
  auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
  Tensor tOgO = thr_mma.partition_C(gO);                             // (MMA, MMA_M, MMA_N)
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(TileO{}));  // (row, col) of each
  static_assert(decltype(size(tOgO) == size(acc_o))::value);
  int const max_row = p.seqlen_q - m_block * Traits::kBlockM;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); ++i) {
    if (get<0>(tOcO(i)) < max_row && get<1>(tOcO(i)) < p.head_dim) { tOgO(i) = acc_o(i); }
  }
  store_row_values(lse, gLSE, tOcO, max_row);
}

}  // namespace flash
