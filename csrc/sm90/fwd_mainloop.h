// The Hopper forward's main loop, in its two roles: the producer (one thread issuing TMA loads of Q and of
// the K and V blocks into the shared-memory pipelines) and the consumer warpgroups (Q·Kᵀ, mask, online
// softmax, P·V on wgmma), as FlashAttention-3 composes it.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/block_info.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/softmax.h"
#include "common/utils.h"

#include "gemm.h"
#include "kernel_traits.h"
#include "named_barriers.h"

namespace flash::sm90 {

using namespace cute;

// The work of one thread block: a query block of one (batch, head), and the key blocks it visits,
// [n_block_begin, n_block_end), taken from the last down (the masked ones first, mask.h).
struct BlockWork {
  int m_block, head, batch;
  int n_block_begin, n_block_end;
};

// Two independent flags (fwd_kernel.h), each compiling out what it adds, so that the common variant's code is
// that of before they existed. Varlen: a sequence's rows start at its cu_seqlens offset (the loads' TMA
// coordinates); its key loop is the common one, whose masked blocks (the ragged last one, the causal
// diagonal) are found from the sequence's lengths. ScoreMod: the per-element work of softcap, ALiBi, a
// window's left edge (key blocks below the unmasked ones masked again) and dropout (mask.h, dropout.h).
template <class Traits, bool Varlen, bool ScoreMod>
struct FwdMainloop {
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;

  typename Traits::KernelParams const &kp;
  typename Traits::SharedStorage &shared;
  Pipeline &pipeline_k, &pipeline_v;

  // A varlen sequence's rows start at its first row (seq) of the one-batch TMA view (kernel_traits.h).
  CUTE_DEVICE auto q_gmem(BlockWork const &w, BlockInfo const &seq) const {  // (kBlockM, kHeadDim): TMA coordinates
    FwdParams const &p = kp.params;
    if constexpr (Varlen) {
      bool const varlen = tma_varlen<Varlen>(p);
      Tensor mQ = kp.tma_q.get_tma_tensor(tma_shape_q<Varlen>(p));
      Tensor mQh = domain_offset(make_coord(seq.q_start, _0{}), mQ(_, _, w.head, varlen ? 0 : w.batch));
      return local_tile(mQh, typename Traits::TileQ{}, make_coord(w.m_block, _0{}));
    } else {
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.seqlen_q, p.head_dim, p.heads, p.batch));
      return local_tile(mQ(_, _, w.head, w.batch), typename Traits::TileQ{}, make_coord(w.m_block, _0{}));
    }
  }
  template <class Tma>
  CUTE_DEVICE auto kv_gmem(Tma const &tma, BlockWork const &w, BlockInfo const &seq) const {  // (kBlockN, kHeadDim, n)
    FwdParams const &p = kp.params;
    if constexpr (Varlen) {
      bool const varlen = tma_varlen<Varlen>(p);
      Tensor mKV = tma.get_tma_tensor(tma_shape_k<Varlen>(p));
      Tensor mKVh = domain_offset(make_coord(seq.k_start, _0{}), mKV(_, _, p.kv_head(w.head), varlen ? 0 : w.batch));
      return local_tile(mKVh, typename Traits::TileKV{}, make_coord(_, _0{}));
    } else {
      Tensor mKV = tma.get_tma_tensor(make_shape(p.seqlen_k, p.head_dim, p.heads_kv, p.batch));
      return local_tile(mKV(_, _, p.kv_head(w.head), w.batch), typename Traits::TileKV{}, make_coord(_, _0{}));
    }
  }
  CUTE_DEVICE auto smem_q() const { return make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{}); }
  CUTE_DEVICE auto smem_k() const { return make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKV{}); }
  CUTE_DEVICE auto smem_v() const { return make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKV{}); }
  CUTE_DEVICE auto smem_vt() const { return make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{}); }

  // ---- Producer: called by one thread ----

  // Q, then K of the first block visited, then, per later block, its K and the previous block's V, so
  // that the consumers' Q·Kᵀ of block n - 1 and P·V of block n find their operands in that order.
  CUTE_DEVICE void load(BlockWork const &w, BlockInfo const &seq, PipelineState &write_k, PipelineState &write_v) const {
    auto q_copy =
        tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(smem_q()), group_modes<0, 2>(q_gmem(w, seq)));
    auto k_copy = tma_partition(kp.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(smem_k()),
                                group_modes<0, 2>(kv_gmem(kp.tma_k, w, seq)));  // (gmem (TMA, n), smem (TMA, stages))
    auto v_copy = tma_partition(kp.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(smem_v()),
                                group_modes<0, 2>(kv_gmem(kp.tma_v, w, seq)));
    auto load_k = [&](int n_block) {
      pipeline_k.producer_acquire(write_k);
      copy(kp.tma_k.with(*pipeline_k.producer_get_barrier(write_k), 0), get<0>(k_copy)(_, n_block),
           get<1>(k_copy)(_, write_k.index()));
      ++write_k;
    };
    auto load_v = [&](int n_block) {
      pipeline_v.producer_acquire(write_v);
      copy(kp.tma_v.with(*pipeline_v.producer_get_barrier(write_v), 0), get<0>(v_copy)(_, n_block),
           get<1>(v_copy)(_, write_v.index()));
      ++write_v;
    };
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full, Traits::kTmaBytesQ);
    copy(kp.tma_q.with(shared.q_full, 0), get<0>(q_copy), get<1>(q_copy));
    int n_block = w.n_block_end - 1;
    load_k(n_block);
    for (; n_block > w.n_block_begin; --n_block) {
      load_k(n_block - 1);
      load_v(n_block);
    }
    load_v(w.n_block_begin);
  }

  // ---- Consumers: every thread of the consumer warpgroups ----

  // Runs the loop over key blocks for this thread's warpgroup and leaves the unnormalised O in acc_o and
  // the row statistics in softmax. thread_idx: 0 .. kConsumerThreads - 1.
  // q_phase: the parity of the tiles whose Q this block has loaded before this one.
  template <class MaskT, class Softmax, class AccO>
  CUTE_DEVICE void mma(BlockWork const &w, MaskT const &mask, Softmax &softmax, AccO &acc_o, int thread_idx,
                       PipelineState &read_k, PipelineState &read_v, int q_phase) const {
    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(thread_idx);
    auto thr_o = mma_o.get_thread_slice(thread_idx);
    Tensor tSrQ = thr_s.partition_fragment_A(smem_q());   // descriptors (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_s.partition_fragment_B(smem_k());   // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrV = thr_o.partition_fragment_B(smem_vt());  // (MMA, MMA_N, MMA_K, stages)
    Tensor tScS = thr_s.partition_C(make_identity_tensor(typename Traits::TileS{}));  // (row, col) of each score
    Tensor acc_s = partition_fragment_C(mma_s, typename Traits::TileS{});  // (MMA, MMA_M, MMA_N)
    Tensor tOrP = make_tensor<Element>(acc_as_operand_a(acc_s.layout()));   // P as the A operand of P·V
    float const scale_log2 = kp.params.softmax_scale_log2;

    // Ping-pong: this warpgroup waits for its turn before issuing matmuls and hands the turn on after, to the
    // next warpgroup round-robin. Every warpgroup of the block takes the same number of turns per tile (one
    // per key block and one more, the tile's key blocks being the block's), so the rounds stay in step.
    int const warpgroup = thread_idx / cutlass::NumThreadsPerWarpGroup;
    auto my_turn = [&] {
      if constexpr (Traits::kPingpong) { barrier_sync(Traits::kTurnThreads, FwdBarrier::WarpgroupTurn1, warpgroup); }
    };
    auto next_turn = [&] {
      if constexpr (Traits::kPingpong) {
        constexpr int kLast = Traits::kConsumerWarpgroups - 1;
        // (1 - warpgroup for two: the instructions of before three existed.)
        int const next = kLast == 1 ? 1 - warpgroup : warpgroup == kLast ? 0 : warpgroup + 1;
        barrier_arrive(Traits::kTurnThreads, FwdBarrier::WarpgroupTurn1, next);
      }
    };
    // P, bf16/fp16, into the A operand (the previous P·V has finished reading it). Dropout zeroes entries of
    // the 16-bit P, as the mma.sync forward does, by the same (batch, head, query, key) -> bits function: the
    // wgmma accumulator gives a thread rows g, g + 8 and column pairs 8 apart, the layout dropout.h's paired
    // calls take, so the mma.sync backward regenerates this mask.
    auto to_operand = [&](int n_block) {
      Tensor rP = convert_type<Element>(acc_s);
      if constexpr (ScoreMod) {
        if (kp.params.has_dropout()) {
          Dropout{kp.params, w.batch, w.head}.template drop<true>(rP, tScS, w.m_block * kBlockM, n_block * kBlockN);
        }
      }
      copy(make_tensor(rP.data(), tOrP.layout()), tOrP);
    };

    cutlass::arch::ClusterTransactionBarrier::wait(&shared.q_full, q_phase);
    int const n_block_first_masked = mask.n_block_first_masked(w.m_block);
    // Key blocks below this one are crossed by the window's left edge (ScoreMod only): masked again.
    int const n_block_unmasked_begin = ScoreMod ? mask.n_block_unmasked_begin(w.m_block) : 0;

    if constexpr (!Traits::kIntraWgOverlap) {  // the ablation: each block's two matmuls and softmax in turn
      auto step = [&](int n_block, auto is_first, auto is_masked) __attribute__((always_inline)) {
        pipeline_k.consumer_wait(read_k);
        my_turn();
        gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, read_k.index()), acc_s);
        next_turn();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);
        pipeline_k.consumer_release(read_k);
        ++read_k;
        mask.template apply<decltype(is_masked)::value>(acc_s, tScS, w.m_block, n_block);
        softmax.template update<decltype(is_first)::value>(acc_s, acc_o, scale_log2);
        to_operand(n_block);
        pipeline_v.consumer_wait(read_v);
        my_turn();
        gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, read_v.index()), acc_o);
        next_turn();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        pipeline_v.consumer_release(read_v);
        ++read_v;
      };
      int n_block = w.n_block_end - 1;
      step(n_block, cute::true_type{}, cute::true_type{});
      for (--n_block; n_block >= n_block_first_masked && n_block >= w.n_block_begin; --n_block) {
        step(n_block, cute::false_type{}, cute::true_type{});
      }
      if constexpr (ScoreMod) {
        for (; n_block >= n_block_unmasked_begin && n_block >= w.n_block_begin; --n_block) {
          step(n_block, cute::false_type{}, cute::false_type{});
        }
        for (; n_block >= w.n_block_begin; --n_block) { step(n_block, cute::false_type{}, cute::true_type{}); }
      } else {
        for (; n_block >= w.n_block_begin; --n_block) { step(n_block, cute::false_type{}, cute::false_type{}); }
      }
      return;
    }

    // The first block: S, mask, softmax; its P·V is issued with the next block's Q·Kᵀ.
    int n_block = w.n_block_end - 1;
    pipeline_k.consumer_wait(read_k);
    my_turn();
    gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, read_k.index()), acc_s);
    next_turn();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    pipeline_k.consumer_release(read_k);
    ++read_k;
    mask.template apply<true>(acc_s, tScS, w.m_block, n_block);
    softmax.template exp_step<true>(acc_s, scale_log2);
    to_operand(n_block);

    // Block n_block - 1's Q·Kᵀ and block n_block's P·V in flight together; the softmax of n_block - 1 runs
    // as soon as its scores are in, while P·V still works; O is rescaled once P·V is done.
    auto step = [&](int n_block, auto is_masked) __attribute__((always_inline)) {
      pipeline_k.consumer_wait(read_k);
      my_turn();
      gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, read_k.index()), acc_s);
      pipeline_v.consumer_wait(read_v);
      gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, read_v.index()), acc_o);
      next_turn();
      warpgroup_wait<1>();  // S is in
      warpgroup_fence_operand(acc_s);
      pipeline_k.consumer_release(read_k);
      ++read_k;
      mask.template apply<decltype(is_masked)::value>(acc_s, tScS, w.m_block, n_block);
      // exp2 on the FMA units for some columns (tile_config.h), in unmasked blocks only: their exponents are
      // all finite; the masked blocks are few and keep the special-function unit's exact 0 for hidden scores.
      constexpr int kExp2FmaOf8 = decltype(is_masked)::value ? 0 : Traits::kExp2FmaOf8;
      auto const correction = softmax.template exp_step<false, kExp2FmaOf8>(acc_s, scale_log2);
      warpgroup_wait<0>();  // O is in
      warpgroup_fence_operand(acc_o);
      pipeline_v.consumer_release(read_v);
      ++read_v;
      softmax.rescale(acc_o, correction);
      to_operand(n_block);
    };
    for (--n_block; n_block >= n_block_first_masked && n_block >= w.n_block_begin; --n_block) {
      step(n_block, cute::true_type{});
    }
    if constexpr (ScoreMod) {
      for (; n_block >= n_block_unmasked_begin && n_block >= w.n_block_begin; --n_block) {
        step(n_block, cute::false_type{});
      }
      for (; n_block >= w.n_block_begin; --n_block) { step(n_block, cute::true_type{}); }
    } else {
      for (; n_block >= w.n_block_begin; --n_block) { step(n_block, cute::false_type{}); }
    }

    // The last block's P·V.
    pipeline_v.consumer_wait(read_v);
    my_turn();
    gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, read_v.index()), acc_o);
    next_turn();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    pipeline_v.consumer_release(read_v);
    ++read_v;
  }
};

}  // namespace flash::sm90
