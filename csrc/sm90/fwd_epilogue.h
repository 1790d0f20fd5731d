// The Hopper forward's epilogue: O (normalised, in the input dtype) through shared memory and one TMA store,
// which clips the rows and columns past the tensor's end; the LSE straight from the registers.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/block_info.h"
#include "common/utils.h"

#include "fwd_mainloop.h"
#include "kernel_traits.h"
#include "named_barriers.h"

namespace flash::sm90 {

using namespace cute;

template <class Traits>
struct FwdEpilogue {
  using Element = typename Traits::Element;
  typename Traits::KernelParams const &kp;
  typename Traits::SharedStorage &shared;

  // acc_o: this thread's normalised O; lse: its rows' LSE. Where O shares Q's buffer (kSeparateO false),
  // each warpgroup writes only its own 64 rows, which only its own Q·Kᵀ read, and that has finished. The
  // TMA store is left in flight; the next tile's store() waits for it before writing the buffer again.
  template <class AccO, class Lse>
  CUTE_DEVICE void store(BlockWork const &w, AccO const &acc_o, Lse const &lse, int thread_idx) const {
    FwdParams const &p = kp.params;
    typename Traits::TiledMmaO mma_o;
    Tensor sO = make_tensor(make_smem_ptr(shared.o_buffer()), typename Traits::SmemLayoutQ{});
    if (thread_idx == 0) { tma_store_wait<0>(); }  // the previous tile's O has left the buffer
    barrier_sync(Traits::kConsumerThreads, FwdBarrier::OutputFree);
    auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_o);
    auto thr_copy = smem_copy.get_thread_slice(thread_idx);
    Tensor rO = convert_type<Element>(acc_o);
    copy(smem_copy, thr_copy.retile_S(rO), thr_copy.partition_D(sO));
    cutlass::arch::fence_view_async_shared();  // the generic-proxy writes, visible to the TMA engine

    BlockInfo const seq{p, w.batch, cute::false_type{}};
    Tensor gLSE = local_tile(seq.q_values(p.lse, w.head), Shape<Int<Traits::kBlockM>>{}, make_coord(w.m_block));
    Tensor tOcO = mma_o.get_thread_slice(thread_idx).partition_C(make_identity_tensor(typename Traits::TileQ{}));
    store_row_values(lse, gLSE, tOcO, seq.seqlen_q - w.m_block * Traits::kBlockM);

    barrier_sync(Traits::kConsumerThreads, FwdBarrier::OutputReady);
    if (thread_idx == 0) {
      Tensor mO = kp.tma_o.get_tma_tensor(make_shape(p.seqlen_q, p.head_dim, p.heads, p.batch));
      Tensor gO = local_tile(mO(_, _, w.head, w.batch), typename Traits::TileQ{}, make_coord(w.m_block, _0{}));
      auto o_copy = tma_partition(kp.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO), group_modes<0, 2>(gO));
      copy(kp.tma_o, get<1>(o_copy), get<0>(o_copy));  // (gmem, smem) views: smem -> gmem
      tma_store_arrive();
    }
  }
};

}  // namespace flash::sm90
