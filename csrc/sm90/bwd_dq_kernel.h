// The Hopper dQ kernel of the split backward (it runs after the preprocess and before the dK/dV kernel, and
// rewrites D for it; flash.h): one thread block per (query block, batch, head), holding that block's dQ in
// registers while it walks the key blocks its rows see. A producer warpgroup, of which one thread issues the
// TMA loads (Q and dO once; per key block its K and V into a kStages-deep pipeline), and consumer warpgroups
// of 64 query rows each, which per key block run on wgmma
//   S = Q·Kᵀ,  dP = dO·Vᵀ              (both operands in shared memory)
//   P = exp(S·scale - LSE),  dS = P∘(dP - D)   (in the accumulators' registers)
//   dQ += dS·K                          (dS from registers; K read MN-major)
// with S and dP issued together and P made while dP's product runs (with Traits::kOverlap, dQ's product of
// a step is issued in the next, around its S: tile_config.h's BwdTile). The queries are the M mode of every
// product, so that LSE and D are per accumulator row, as in the mma.sync kernel (sm80/bwd_dq_kernel.h),
// which this one matches in what it writes, D's rewrite included. Plain or causal, fixed-length or varlen; with
// General also softcap, ALiBi, a window's left edge and dropout (mask.h, dropout.h), as that kernel has them:
// dS = P∘(dP∘Z / (1 - p) - D) for the keep mask Z, the undropped P, and D's rewrite from that dS.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "common/block_info.h"
#include "common/d_rewrite.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/utils.h"

#include "bwd_kernel_traits.h"
#include "gemm.h"
#include "named_barriers.h"

namespace flash::sm90 {

using namespace cute;

// Windowed: causal or a right window edge (mask.h), a run-time value as in the other kernels.
// Varlen: cu_seqlens may be given: each sequence's rows from its offset in the one-batch TMA views
// (kernel_traits.h), its lengths from BlockInfo; blocks past the sequence's end leave at once, and a dQ tile
// that crosses it is stored by rows (BwdRowStore), as the next sequence's rows are another block's.
// General: mask.h's (in translation units of their own, bwd_launch.h run_bwd_dq_general).
template <class Traits, bool Windowed, bool Varlen, bool General = false>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_dq_kernel(__grid_constant__ const typename Traits::KernelParams kp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma and setmaxnreg exist in sm_90a code only
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  extern __shared__ char smem[];
  auto &shared = *reinterpret_cast<typename Traits::SharedStorage *>(smem);
  BwdParams const &params = kp.params;
  int const m_block = gridDim.x - 1 - blockIdx.x;  // blocks with the most keys (causal) first
  int const batch = blockIdx.y, head = blockIdx.z;

  BlockInfo const seq{params, batch, cute::bool_constant<Varlen>{}};
  if constexpr (Varlen) {
    if (m_block * kBlockM >= seq.seqlen_q) { return; }  // the grid covers the longest sequence: the whole block leaves
  }
  using ScoreMask = Mask<kBlockM, kBlockN, Windowed, General>;
  ScoreMask const mask{params, seq, head};  // (query, key) blocks
  int const n_block_begin = mask.n_block_begin(m_block), n_block_end = mask.n_block_end(m_block);
  bool const has_keys = n_block_end > n_block_begin;  // else dQ = 0 (causal rows before the first key)

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});  // (M, D)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});  // (N, D, stages)
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});  // (D, N, stages)

  int const warpgroup = cutlass::canonical_warp_group_idx();  // 0: producer
  bool const producer = warpgroup == 0;
  if (threadIdx.x == 0) {
    prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_do.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full, 1);
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = 2 * Traits::kTmaBytesK;  // K and V
  pipeline_params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline(shared.pipeline_kv, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers are initialised before anyone waits on them

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x == 0 && has_keys) {
      // TMA views (kernel_traits.h): rows past seqlen_q or seqlen_k and columns past head_dim land as zeros;
      // varlen, rows past the sequence's end are the next sequence's (unused query rows, masked keys) or,
      // past the tensor's end, zeros.
      Tensor mQ = kp.tma_q.get_tma_tensor(tma_shape_q<Varlen>(params));
      Tensor mdO = kp.tma_do.get_tma_tensor(tma_shape_q<Varlen>(params));
      Tensor mK = kp.tma_k.get_tma_tensor(tma_shape_k<Varlen>(params));
      Tensor mV = kp.tma_v.get_tma_tensor(tma_shape_k<Varlen>(params));
      int const kv_head = params.kv_head(head);
      auto q_view = [&](auto const &m) { return sequence_rows<Varlen>(m, params, head, batch, seq.q_start); };
      auto k_view = [&](auto const &m) { return sequence_rows<Varlen>(m, params, kv_head, batch, seq.k_start); };
      Tensor gQ = local_tile(q_view(mQ), typename Traits::TileQ{}, make_coord(m_block, _0{}));
      Tensor gdO = local_tile(q_view(mdO), typename Traits::TileQ{}, make_coord(m_block, _0{}));
      Tensor gK = local_tile(k_view(mK), typename Traits::TileK{}, make_coord(_, _0{}));  // (N, D, n)
      Tensor gV = local_tile(k_view(mV), typename Traits::TileK{}, make_coord(_, _0{}));
      auto q_copy = tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto do_copy = tma_partition(kp.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      auto k_copy = tma_partition(kp.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto v_copy = tma_partition(kp.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full, 2 * Traits::kTmaBytesQ);
      copy(kp.tma_q.with(shared.q_full, 0), get<0>(q_copy), get<1>(q_copy));
      copy(kp.tma_do.with(shared.q_full, 0), get<0>(do_copy), get<1>(do_copy));
      auto write = cutlass::make_producer_start_state<Pipeline>();
      for (int n_block = n_block_end - 1; n_block >= n_block_begin; --n_block) {  // the consumers' order
        pipeline.producer_acquire(write);
        auto *full = pipeline.producer_get_barrier(write);
        copy(kp.tma_k.with(*full, 0), get<0>(k_copy)(_, n_block), get<1>(k_copy)(_, write.index()));
        copy(kp.tma_v.with(*full, 0), get<0>(v_copy)(_, n_block), get<1>(v_copy)(_, write.index()));
        ++write;
      }
    }
    return;  // the consumers keep the block, and its shared memory, alive until the last load has landed
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  int const thread_idx = threadIdx.x - cutlass::NumThreadsPerWarpGroup;
  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaDq mma_dq;
  Tensor acc_dq = partition_fragment_C(mma_dq, typename Traits::TileQ{});  // (MMA, MMA_M, MMA_N): 64 rows
  clear(acc_dq);
  Tensor tScS = mma_s.get_thread_slice(thread_idx).partition_C(make_identity_tensor(typename Traits::TileS{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rows_cols(tScS.layout()));  // (query, key) of each score
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // the query rows this thread holds
  Tensor mD = seq.q_values(params.dpsum, head);
  Tensor gD = local_tile(mD, Shape<Int<kBlockM>>{}, make_coord(m_block));
  int const q_rows_left = seq.seqlen_q - m_block * kBlockM;

  if (has_keys) {
    auto thr_s = mma_s.get_thread_slice(thread_idx);
    auto thr_dq = mma_dq.get_thread_slice(thread_idx);
    // Q's and dO's descriptors depend on the warpgroup only: from its first thread's slice (warp-uniform),
    // as the dK/dV kernel takes K's and V's, they can stay in uniform registers.
    auto thr_s_wg = mma_s.get_thread_slice((warpgroup - 1) * cutlass::NumThreadsPerWarpGroup);
    Tensor tSrQ = thr_s_wg.partition_fragment_A(sQ);
    Tensor tdPrdO = thr_s_wg.partition_fragment_A(sdO);
    Tensor tSrK = thr_s.partition_fragment_B(sK);     // (MMA, MMA_N, MMA_K, stages)
    Tensor tdPrV = thr_s.partition_fragment_B(sV);
    Tensor tdQrK = thr_dq.partition_fragment_B(sKt);  // (MMA, MMA_N, MMA_K, stages)

    // This thread's rows: LSE in log2 units (+inf past seqlen_q, so P = 0 there; Q and dO are zeros) and D.
    Tensor gLSE = local_tile(seq.q_values(params.lse, head), Shape<Int<kBlockM>>{}, make_coord(m_block));
    float lse_log2[kRows], dpsum[kRows];
    DRewrite<kRows> d_rewrite;  // rowsum(dS), rowsum(P) over every key the row sees, for D's rewrite (the end)
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = get<0>(tScS_rc(r, 0));
      bool const in_range = row < q_rows_left;
      lse_log2[r] = in_range ? gLSE(row) * float(M_LOG2E) : INFINITY;
      dpsum[r] = in_range ? gD(row) : 0.f;
    }
    float const scale_log2 = params.softmax_scale_log2;
    typename Traits::PipelineState read;
    // Overlap (tile_config.h): the previous step's dS and stage, whose dQ product this step issues.
    typename Traits::PipelineState read_prev;
    Tensor rdS_prev = make_tensor<Element>(partition_fragment_C(mma_s, typename Traits::TileS{}).layout());
    auto issue_dq = [&](int stage) __attribute__((always_inline)) {
      gemm_issue<false>(mma_dq, make_tensor(rdS_prev.data(), acc_as_operand_a(rdS_prev.layout())),
                        tdQrK(_, _, _, stage), acc_dq);
    };
    // Once the previous dQ product is done: it has read its stage's K, and rdS_prev.
    auto release_prev = [&]() __attribute__((always_inline)) {
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(rdS_prev);
      pipeline.consumer_release(read_prev);
    };
    cutlass::arch::ClusterTransactionBarrier::wait(&shared.q_full, 0);

    // has_prev: overlap, and not the first step (a compile-time tag: warpgroup_wait's count depends on it).
    auto step = [&](int n_block, auto is_masked, auto has_prev) __attribute__((always_inline)) {
      constexpr bool kHasPrev = decltype(has_prev)::value;
      constexpr bool kBeforeS = kHasPrev && Traits::kOverlap == 2, kAfterS = kHasPrev && Traits::kOverlap == 1;
      pipeline.consumer_wait(read);
      int const stage = read.index();
      Tensor acc_s = partition_fragment_C(mma_s, typename Traits::TileS{});   // S: (MMA, MMA_M, MMA_N)
      Tensor acc_dp = partition_fragment_C(mma_s, typename Traits::TileS{});  // dP
      if constexpr (kBeforeS) { issue_dq(read_prev.index()); }
      gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, stage), acc_s);
      // After S, so that the exponentials wait for S only, and they run beside it and dP.
      if constexpr (kAfterS) { issue_dq(read_prev.index()); }
      gemm_issue<true>(mma_s, tdPrdO, tdPrV(_, _, _, stage), acc_dp);
      // The keep bits (one register: a 64 x kBlockN tile per warpgroup), made while both products run.
      [[maybe_unused]] KeepMask<decltype(tScS)> keep{};  // used by the general variant only
      if constexpr (General) {
        if (params.has_dropout()) {
          keep = Dropout{params, batch, head}.template keep_mask<false, true>(tScS, m_block * kBlockM,
                                                                              n_block * kBlockN);
        }
      }
      warpgroup_wait<kAfterS ? 2 : 1>();  // S is in; dP still runs (in order: a dQ product issued before S is done)
      if constexpr (kBeforeS) { release_prev(); }
      warpgroup_fence_operand(acc_s);
      mask.template apply<decltype(is_masked)::value>(acc_s, tScS, m_block, n_block);
      Tensor p = make_tensor(acc_s.data(), rows_cols(acc_s.layout()));  // P = exp(S·scale - LSE), in place
      CUTE_UNROLL
      for (int r = 0; r < size<0>(p); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(p); ++c) { p(r, c) = exp2_approx(p(r, c) * scale_log2 - lse_log2[r]); }
      }
      warpgroup_wait<0>();  // dP is in (and the previous dQ product, which has read its stage's K)
      warpgroup_fence_operand(acc_dp);
      if constexpr (kAfterS) { release_prev(); }
      if constexpr (General) {
        if (params.has_dropout()) { apply_keep_mask(keep, acc_dp, params.dropout_scale); }
      }
      Tensor ds = make_tensor(acc_dp.data(), rows_cols(acc_dp.layout()));  // dS = P∘(dP - D), in place
      CUTE_UNROLL
      for (int r = 0; r < size<0>(ds); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(ds); ++c) {
          ds(r, c) = p(r, c) * (ds(r, c) - dpsum[r]);
          d_rewrite.add(r, p(r, c), ds(r, c));
        }
      }
      mask.chain_rule(acc_dp, acc_s, lse_log2, tScS, m_block, n_block);
      if constexpr (Traits::kOverlap != 0) {  // dQ's product goes out with the next step's S (or after the loop)
        copy(convert_type<Element>(acc_dp), rdS_prev);
        read_prev = read;
      } else {
        Tensor rdS = convert_type<Element>(acc_dp);
        gemm_issue<false>(mma_dq, make_tensor(rdS.data(), acc_as_operand_a(rdS.layout())), tdQrK(_, _, _, stage),
                          acc_dq);
        warpgroup_wait<0>();  // dQ's product has read this stage's K
        warpgroup_fence_operand(acc_dq);
        pipeline.consumer_release(read);
      }
      ++read;
    };

    // Key blocks from the last down: the ragged last one and those the causal diagonal (or right window
    // edge) crosses masked first, those the left edge crosses (General) masked last, the rest not (mask.h).
    int const n_block_first_masked = mask.n_block_first_masked(m_block);
    int const n_block_unmasked_begin = mask.n_block_unmasked_begin(m_block);  // 0 without the left edge
    int n_block = n_block_end - 1;
    if constexpr (Traits::kOverlap != 0) {  // the first step has no previous dQ product to issue
      bool masked = n_block >= n_block_first_masked;
      if constexpr (ScoreMask::kLeftEdge) { masked = masked || n_block < n_block_unmasked_begin; }
      if (masked) {
        step(n_block, cute::true_type{}, cute::false_type{});
      } else {
        step(n_block, cute::false_type{}, cute::false_type{});
      }
      --n_block;
    }
    constexpr auto has_prev = cute::bool_constant<Traits::kOverlap != 0>{};
    for (; n_block >= n_block_begin && n_block >= n_block_first_masked; --n_block) { step(n_block, cute::true_type{}, has_prev); }
    for (; n_block >= n_block_begin && n_block >= n_block_unmasked_begin; --n_block) {
      step(n_block, cute::false_type{}, has_prev);
    }
    if constexpr (ScoreMask::kLeftEdge) {
      for (; n_block >= n_block_begin; --n_block) { step(n_block, cute::true_type{}, has_prev); }
    }
    if constexpr (Traits::kOverlap != 0) {  // the last step's dQ product
      issue_dq(read_prev.index());
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dq);
      pipeline.consumer_release(read_prev);
    }

    // D rewritten as rowsum(P∘dP) (d_rewrite.h), as the mma.sync dQ kernel does.
    d_rewrite.store(dpsum, gD, tScS, q_rows_left);
  }

  // dQ (w.r.t. the scaled scores: the scale comes in once, here) through Q's buffer and a TMA store, which
  // clips the rows past seqlen_q and the columns past head_dim (varlen: past the tensor's end only, so that
  // a tile crossing its sequence's end is stored by rows). Each warpgroup writes only its own 64 rows,
  // which only its own matmuls read, and those have finished.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) { acc_dq(i) *= params.softmax_scale; }
  auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_dq);
  auto thr_copy = smem_copy.get_thread_slice(thread_idx);
  Tensor rdQ = convert_type<Element>(acc_dq);
  copy(smem_copy, thr_copy.retile_S(rdQ), thr_copy.partition_D(sQ));
  cutlass::arch::fence_view_async_shared();  // the generic-proxy writes, visible to the TMA engine
  barrier_sync(Traits::kConsumerThreads, BwdBarrier::GradsReady);
  if constexpr (Varlen) {
    if (tma_varlen<Varlen>(params) && (m_block + 1) * kBlockM > seq.seqlen_q) {
      Tensor gdQ = local_tile(seq.template q_rows<Traits::kHeadDim, Element>(params.dq, head), typename Traits::TileQ{},
                              make_coord(m_block, _0{}));  // (kBlockM, kHeadDim)
      Traits::RowStore::store(sQ, gdQ, seq.seqlen_q - m_block * kBlockM, params.head_dim, thread_idx);
      return;
    }
  }
  if (thread_idx == 0) {
    Tensor mdQ = kp.tma_dq.get_tma_tensor(tma_shape_q<Varlen>(params));
    Tensor gdQ = local_tile(sequence_rows<Varlen>(mdQ, params, head, batch, seq.q_start), typename Traits::TileQ{},
                            make_coord(m_block, _0{}));
    auto dq_copy = tma_partition(kp.tma_dq, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gdQ));
    copy(kp.tma_dq, get<1>(dq_copy), get<0>(dq_copy));  // (gmem, smem) views: smem -> gmem
    tma_store_arrive();
    tma_store_wait<0>();  // shared memory stays ours until the store has read it
  }
#endif
}

}  // namespace flash::sm90
