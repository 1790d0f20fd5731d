// Writing results: an fp32 accumulator tile goes to global memory through shared memory, so that the
// global stores are 16 bytes wide and coalesced (per-row statistics: store_row_values, common/utils.h).
#pragma once

#include <cute/tensor.hpp>

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

}  // namespace flash
