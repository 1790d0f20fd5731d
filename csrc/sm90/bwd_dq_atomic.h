// The atomic dQ of the Hopper dK/dV kernel (bwd_dkdv_kernel.h with AtomicDq: the non-deterministic backward,
// FlashAttention-2's Algorithm 2 unsplit): after a step's dSᵀ, its share of dQ, dQ_partial = dS·K·scale for
// the step's 64 queries, by wgmma from shared memory, added into the fp32 params.dq_accum (flash.h; the
// binding casts it into dq). How the consumer warpgroups split the product: BwdDkdvAtomicDqTraits.
//
// The adds are red.global.add.v2.f32 (atomicAdd of a float2, sm_90), straight from the accumulators, which
// hold pairs of neighbouring columns: no fp32 staging tile in shared memory (a TMA reduce-add,
// cp.reduce.async.bulk, would need 16 or 32 KB more and a wait before its buffer is written again), rows
// past the sequence's end and columns past head_dim left out by a predicate (a TMA box would add zeros into
// the next sequence's rows, harmless but a second view of the varlen layout), and the same layout and
// convert as the mma.sync kernel's atomic dQ. Either way the L2 does the adds; the order varies from run to
// run, so dQ's last bits do.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/flash.h"

#include "bwd_kernel_traits.h"
#include "gemm.h"
#include "named_barriers.h"

namespace flash::sm90 {

using namespace cute;

template <class Traits>  // a BwdDkdvAtomicDqTraits
struct BwdDqAtomic {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM, kHeadDim = Traits::kHeadDim;

  Element *ds;       // the dS buffers (SharedStorage::ds)
  Element const *k;  // K's buffer, loaded (kv_full waited)
  int warpgroup;     // this consumer warpgroup: 0 or 1
  int thread_idx;    // among the consumers

  // dSᵀ, rdS: this thread's part of the step's (kBlockN, kBlockM) tile, as the Sᵀ accumulators of mma_st hold
  // it (16-bit). dQ[m_block] += dS·K·scale; every consumer thread calls it once per step, in step order. Waits
  // on every wgmma batch the warpgroup has in flight (a dK product issued before it too).
  template <class TiledMmaSt, class RdS, class Seq>
  CUTE_DEVICE void add(TiledMmaSt const &mma_st, RdS const &rdS, int m_block, BwdParams const &params, Seq const &seq,
                       int head) const {
    Element *buffer = ds + (m_block % Traits::kDsBuffers) * cosize_v<typename Traits::SmemLayoutdSt>;
    Element const *k_buffer = k;
    int tid = thread_idx, wg = warpgroup;
    // Addresses, descriptors and this thread's coordinates rebuilt in every step, from values the compiler
    // cannot see through, rather than hoisted out of the loop into registers that the D = 128 kernel does
    // not have (as its K and V descriptors: BwdTile's desc_per_step).
    asm volatile("" : "+l"(buffer), "+l"(k_buffer), "+r"(tid), "+r"(wg));
    Tensor sdSt = make_tensor(make_smem_ptr(buffer), typename Traits::SmemLayoutdSt{});  // (kBlockN, kBlockM)
    auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_st);
    auto thr_copy = smem_copy.get_thread_slice(tid);
    copy(smem_copy, thr_copy.retile_S(rdS), thr_copy.partition_D(sdSt));
    cutlass::arch::fence_view_async_shared();  // the generic-proxy writes, visible to wgmma
    if constexpr (Traits::kDqSplitN) {  // the product reads every warpgroup's rows
      barrier_sync(Traits::kConsumerThreads, BwdBarrier::DsReady);
    } else {  // its own rows only
      barrier_sync(cutlass::NumThreadsPerWarpGroup, BwdBarrier::DsReady, wg);
    }

    typename Traits::TiledMmaDq mma_dq;
    auto thr_dq = mma_dq.get_thread_slice(tid % cutlass::NumThreadsPerWarpGroup);
    Tensor sdS = make_tensor(make_smem_ptr(buffer + wg * Traits::kOffsetdS),
                             typename Traits::SmemLayoutdSdq{});  // (kBlockM, kDqK)
    Tensor sKt = make_tensor(make_smem_ptr(k_buffer + wg * Traits::kOffsetK),
                             typename Traits::SmemLayoutKtdq{});  // (kDqN, kDqK)
    Tensor acc_dq = partition_fragment_C(mma_dq, typename Traits::TileDq{});  // (MMA, MMA_M, MMA_N)
    gemm_issue<true>(mma_dq, thr_dq.partition_fragment_A(sdS), thr_dq.partition_fragment_B(sKt), acc_dq);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dq);

    // (kBlockM, kHeadDim): rows past seqlen_q and columns past head_dim are not touched. Each accumulator pair
    // (i, i + 1) is one row's neighbouring columns: 8-byte aligned, as dq_accum is contiguous fp32 with an
    // even head_dim (a multiple of 8).
    static_assert(decltype(size<0, 0>(acc_dq))::value == 2);
    Tensor gdQaccum = local_tile(seq.template q_rows<kHeadDim, float>(params.dq_accum, head),
                                 Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
    Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(typename Traits::TileDq{}));  // (query, column)
    int const rows = seq.seqlen_q - m_block * kBlockM;
    int const col0 = Traits::kDqSplitN ? wg * Traits::kDqN : 0;
    float const scale = params.softmax_scale;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); i += 2) {
      int const row = get<0>(tdQcdQ(i)), col = col0 + get<1>(tdQcdQ(i));
      if (row < rows && col < params.head_dim) {
        atomicAdd(reinterpret_cast<float2 *>(&gdQaccum(row, col)), make_float2(acc_dq(i) * scale, acc_dq(i + 1) * scale));
      }
    }
  }

  // Split N, before the epilogue writes dK over K's buffer: the other warpgroup's last product may still read
  // this one's rows. Every consumer thread calls it, after its last add().
  CUTE_DEVICE static void release_k() {
    if constexpr (Traits::kDqSplitN) { barrier_sync(Traits::kConsumerThreads, BwdBarrier::KFree); }
  }
};

}  // namespace flash::sm90
