// The Hopper forward kernel (FlashAttention-3's schedule on FlashAttention-2's algorithm): persistent thread
// blocks, each walking (query block, head, batch) tiles (sm90/tile_scheduler.h); a producer warpgroup whose
// one thread streams Q, K and V in by TMA, and two (or three) consumer warpgroups, 64 query rows each,
// running Q·Kᵀ, the online softmax and P·V on wgmma with the softmax overlapped with the matmuls
// (sm90/fwd_mainloop.h).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "common/block_info.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/softmax.h"

#include "fwd_epilogue.h"
#include "fwd_mainloop.h"
#include "kernel_traits.h"
#include "named_barriers.h"
#include "tile_scheduler.h"

namespace flash::sm90 {

using namespace cute;

// Windowed: causal or a window (mask.h). The mma.sync forward's General variant (sm80/fwd_kernel.h) is two
// independent flags here, each compiling out what it adds when off:
//  - Varlen: cu_seqlens may be given: per-sequence offsets and lengths (block_info.h), tiles past a
//    sequence's end skipped, the key loop the common one (its masking of the ragged last key block and the
//    causal diagonal, aligned bottom-right, from the sequence's lengths).
//  - ScoreMod: softcap, ALiBi, a window's left edge and dropout: per-element work in the key loop, which at
//    D = 128 is three times the common loop's instructions (benchmarks/NOTES.md), so plain and causal varlen
//    calls run without it.
// Instantiated as (false, false), the common variant, in its own unit; (true, true), the general one, and
// (true, false) where tile_config.h's varlen_common_loop says so, in the general unit (fwd_launch.h).
template <class Traits, bool Windowed, bool Varlen, bool ScoreMod>
__global__ void __launch_bounds__(Traits::kThreads, 1) fwd_kernel(__grid_constant__ const typename Traits::KernelParams kp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma and setmaxnreg exist in sm_90a code only
  using Pipeline = typename Traits::Pipeline;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  extern __shared__ char smem[];
  SharedStorage &shared = *reinterpret_cast<SharedStorage *>(smem);
  FwdParams const &params = kp.params;

  int const warpgroup = cutlass::canonical_warp_group_idx();  // 0: producer
  bool const producer = warpgroup == 0;
  if (threadIdx.x == 0) {
    prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_o.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full, 1);
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kTmaBytesKV;
  pipeline_params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  pipeline_params.initializing_warp = 1;
  Pipeline pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers are initialised before anyone waits on them

  if (ScoreMod && params.has_dropout() && params.rng_state_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    // Under CUDA-graph capture only the device knows a replay's (seed, offset): the backward reads them here.
    uint64_t seed, offset;
    unpack_rng(params.rng, seed, offset);
    params.rng_state_out[0] = int64_t(seed);
    params.rng_state_out[1] = int64_t(offset);
  }

  // Causal tiles differ in length: a static walk over them left SMs idle at the end (0.73-0.9x on the H200,
  // benchmarks/NOTES.md), so causal grids get one block per tile, longest first, from the hardware.
  TileScheduler<kBlockM, Traits::kPersistent && !Windowed> const scheduler{params};
  // Where the tile's sequence lies (varlen: from cu_seqlens, clamped), made where it is used: carried in
  // plan's tuple beside the mask, it cost the common variant's D = 256 causal kernel a spill.
  auto sequence = [&](BlockWork const &w) { return BlockInfo{params, w.batch, cute::bool_constant<Varlen>{}}; };
  // The tile's key blocks; none for causal rows above the first key, rows whose window's left edge lies past
  // the last key, or a varlen sequence without keys (O = 0, LSE = +inf or the sink).
  auto plan = [&](int tile) {
    BlockWork w = scheduler.work(tile);
    Mask<kBlockM, kBlockN, Windowed, ScoreMod> const mask{params, sequence(w), w.head};
    w.n_block_begin = mask.n_block_begin(w.m_block);
    w.n_block_end = mask.n_block_end(w.m_block);
    return cute::make_tuple(w, mask);
  };
  auto has_keys = [](BlockWork const &w) { return !(Windowed || Varlen || ScoreMod) || w.n_block_end > w.n_block_begin; };
  // Varlen: the scheduler's tiles cover the longest sequence; those past this one's end are skipped, by the
  // producer and the consumers alike, so that their barriers and pipelines stay in step.
  auto has_rows = [](BlockWork const &w, BlockInfo const &seq) { return !Varlen || w.m_block * kBlockM < seq.seqlen_q; };
  // The producer waits on QueryFree for the consumers and its own warp.
  constexpr int kQueryFreeThreads = Traits::kConsumerThreads + cutlass::NumThreadsPerWarp;

  FwdMainloop<Traits, Varlen, ScoreMod> mainloop{kp, shared, pipeline_k, pipeline_v};
  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (cutlass::canonical_warp_idx_sync() == 0) {
      auto write_k = cutlass::make_producer_start_state<Pipeline>();
      auto write_v = cutlass::make_producer_start_state<Pipeline>();
      for (int tile = scheduler.first(), i = 0; scheduler.valid(tile); tile = scheduler.next(tile)) {
        BlockWork const w = get<0>(plan(tile));
        BlockInfo const seq = sequence(w);
        if (!has_rows(w, seq)) { continue; }
        if (i > 0) { barrier_sync(kQueryFreeThreads, FwdBarrier::QueryFree); }  // Q's buffer is free
        if (threadIdx.x == 0 && has_keys(w)) { mainloop.load(w, seq, write_k, write_v); }
        __syncwarp();
        ++i;  // tiles taken
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    int const thread_idx = threadIdx.x - cutlass::NumThreadsPerWarpGroup;
    if constexpr (Traits::kPingpong) {  // warpgroup 0 (of the consumers) goes first, handed its turn by the last
      if (warpgroup == Traits::kConsumerWarpgroups) {
        barrier_arrive(Traits::kTurnThreads, FwdBarrier::WarpgroupTurn1, 0);
      }
    }
    FwdEpilogue<Traits, Varlen> const epilogue{kp, shared};
    typename Traits::PipelineState read_k, read_v;
    int q_phase = 0;
    for (int tile = scheduler.first(); scheduler.valid(tile); tile = scheduler.next(tile)) {
      auto [w, mask] = plan(tile);
      if (!has_rows(w, sequence(w))) { continue; }
      typename Traits::TiledMmaO mma_o;
      Tensor acc_o = partition_fragment_C(mma_o, typename Traits::TileQ{});  // (MMA, MMA_M, MMA_N)
      clear(acc_o);
      OnlineSoftmax<2> softmax;  // each thread holds two rows of its warpgroup's 64
      if (has_keys(w)) {
        mainloop.mma(w, mask, softmax, acc_o, thread_idx, read_k, read_v, q_phase);
        q_phase ^= 1;
      } else {
        CUTE_UNROLL
        for (int r = 0; r < 2; ++r) { softmax.row_max[r] = -INFINITY, softmax.row_sum[r] = 0.f; }
      }
      if constexpr (Traits::kSeparateO) { barrier_arrive(kQueryFreeThreads, FwdBarrier::QueryFree); }
      float const sink_log2 = params.sinks == nullptr ? -INFINITY : params.sinks[w.head] * float(M_LOG2E);
      // Dropout: the row sums (and LSE) are those of the undropped P; the kept entries' 1 / (1 - p), once on O.
      Tensor lse = softmax.finalize(acc_o, sink_log2, ScoreMod && params.has_dropout() ? params.dropout_scale : 1.f);
      // The sequence made again (varlen: cu_seqlens read again) rather than kept live across the key loop.
      epilogue.store(w, sequence(w), acc_o, lse, thread_idx);
      if constexpr (!Traits::kSeparateO) {  // O went out of Q's buffer: wait until it has left
        if (thread_idx == 0) { tma_store_wait<0>(); }
        barrier_arrive(kQueryFreeThreads, FwdBarrier::QueryFree);
      }
    }
    if (thread_idx == 0) { tma_store_wait<0>(); }  // shared memory stays ours until the last store has read it
  }
#endif
}

}  // namespace flash::sm90
