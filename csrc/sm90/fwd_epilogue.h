// The Hopper forward's epilogue: O (normalised, in the input dtype) through shared memory and one TMA store,
// which clips the rows and columns past the tensor's end; the LSE straight from the registers. A varlen
// sequence's rows end inside the tensor (the next sequence's follow): a tile that lies wholly inside its
// sequence still goes out by TMA, at the sequence's offset; one that crosses the sequence's end the
// consumers copy out themselves, predicated by row.
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

template <class Traits, bool Varlen>
struct FwdEpilogue {
  using Element = typename Traits::Element;
  typename Traits::KernelParams const &kp;
  typename Traits::SharedStorage &shared;

  // acc_o: this thread's normalised O; lse: its rows' LSE. Where O shares Q's buffer (kSeparateO false),
  // each warpgroup writes only its own 64 rows, which only its own Q·Kᵀ read, and that has finished. The
  // TMA store is left in flight; the next tile's store() waits for it before writing the buffer again.
  template <class AccO, class Lse>
  CUTE_DEVICE void store(BlockWork const &w, BlockInfo const &seq, AccO const &acc_o, Lse const &lse,
                         int thread_idx) const {
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

    Tensor gLSE = local_tile(seq.q_values(p.lse, w.head), Shape<Int<Traits::kBlockM>>{}, make_coord(w.m_block));
    Tensor tOcO = mma_o.get_thread_slice(thread_idx).partition_C(make_identity_tensor(typename Traits::TileQ{}));
    store_row_values(lse, gLSE, tOcO, seq.seqlen_q - w.m_block * Traits::kBlockM);

    barrier_sync(Traits::kConsumerThreads, FwdBarrier::OutputReady);
    if constexpr (Varlen) {
      if (tma_varlen<Varlen>(p)) {
        if ((w.m_block + 1) * Traits::kBlockM > seq.seqlen_q) {
          store_rows(w, seq, sO, thread_idx);
          return;
        }
        if (thread_idx == 0) {  // the whole tile is this sequence's: rows [q_start, ...) of the one-batch view
          Tensor mO = kp.tma_o.get_tma_tensor(tma_shape_q<Varlen>(p));
          Tensor mOh = domain_offset(make_coord(seq.q_start, _0{}), mO(_, _, w.head, 0));
          store_tma(local_tile(mOh, typename Traits::TileQ{}, make_coord(w.m_block, _0{})), sO);
        }
        return;
      }
    }
    if (thread_idx == 0) {
      Tensor mO = kp.tma_o.get_tma_tensor(make_shape(p.seqlen_q, p.head_dim, p.heads, p.batch));
      store_tma(local_tile(mO(_, _, w.head, w.batch), typename Traits::TileQ{}, make_coord(w.m_block, _0{})), sO);
    }
  }

  // gO: the tile's (kBlockM, kHeadDim) TMA coordinates. Called by one thread; the store is left in flight.
  template <class GmemO, class SmemO>
  CUTE_DEVICE void store_tma(GmemO const &gO, SmemO const &sO) const {
    auto o_copy = tma_partition(kp.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO), group_modes<0, 2>(gO));
    copy(kp.tma_o, get<1>(o_copy), get<0>(o_copy));  // (gmem, smem) views: smem -> gmem
    tma_store_arrive();
  }

  // O from shared memory to this sequence's rows, 16 bytes per copy; none past the sequence's last row or
  // past head_dim (a multiple of 8). Every consumer's copies have read the buffer before it arrives at the
  // barrier that lets the next tile write it (OutputFree, or QueryFree where O shares Q's buffer).
  template <class SmemO>
  CUTE_DEVICE void store_rows(BlockWork const &w, BlockInfo const &seq, SmemO const &sO, int thread_idx) const {
    FwdParams const &p = kp.params;
    Tensor gO = local_tile(seq.template q_rows<Traits::kHeadDim, Element>(p.o, w.head), typename Traits::TileQ{},
                           make_coord(w.m_block, _0{}));  // (kBlockM, kHeadDim)
    typename Traits::GmemTiledCopyO gmem_copy;
    auto thr_copy = gmem_copy.get_thread_slice(thread_idx);
    Tensor tOsO = thr_copy.partition_S(sO);  // (CPY, CPY_M, CPY_K)
    Tensor tOgO = thr_copy.partition_D(gO);
    Tensor tOcO = thr_copy.partition_D(make_identity_tensor(typename Traits::TileQ{}));
    int const rows_left = seq.seqlen_q - w.m_block * Traits::kBlockM;
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tOsO); ++m) {
      if (get<0>(tOcO(0, m, 0)) < rows_left) {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tOsO); ++k) {
          if (get<1>(tOcO(0, m, k)) < p.head_dim) { copy(gmem_copy, tOsO(_, m, k), tOgO(_, m, k)); }
        }
      }
    }
  }
};

}  // namespace flash::sm90
