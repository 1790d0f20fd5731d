// The Hopper dK/dV kernel of the split backward (a dQ kernel, sm80 or sm90, runs first and rewrites D; flash.h):
// one thread block per (key block, batch, query head), holding that block's dK and dV in registers while
// it walks the query blocks that see its keys. A producer warpgroup, of which one thread issues the TMA
// loads (K and V once; per query block its Q and dO into a kStages-deep pipeline), and consumer
// warpgroups of 64 keys each, which per query block run on wgmma
//   Sᵀ = K·Qᵀ,  dPᵀ = V·dOᵀ            (both operands in shared memory)
//   Pᵀ = exp(Sᵀ·scale - LSE),  dSᵀ = Pᵀ∘(dPᵀ - D)   (in the accumulators' registers)
//   dV += Pᵀ·dO,  dK += dSᵀ·Q          (Pᵀ, dSᵀ from registers; dO, Q read MN-major)
// with Sᵀ and dPᵀ issued together and dV's product in flight while dSᵀ is computed (with Traits::kOverlap,
// dK's product of a step is issued in the next, around its Sᵀ: tile_config.h's BwdTile). Plain or causal,
// fixed-length or varlen; with General also softcap, ALiBi, a window's left edge and dropout (mask.h,
// dropout.h): dV takes the dropped Pᵀ (its 1 / (1 - p) applied once to dV), dSᵀ the undropped Pᵀ with the
// masked, rescaled dPᵀ, as in the mma.sync kernel (sm80/bwd_dkdv_kernel.h), which this one matches in what it
// writes. AtomicDq (the non-deterministic backward): each step also adds its share of dQ into
// params.dq_accum (bwd_dq_atomic.h), 5 matmuls in all and no dQ kernel; D is then the preprocess's.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "common/block_info.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/utils.h"

#include "bwd_dq_atomic.h"
#include "bwd_kernel_traits.h"
#include "gemm.h"
#include "named_barriers.h"

namespace flash::sm90 {

using namespace cute;

// Windowed: causal or a right window edge (mask.h), a run-time value as in the other kernels.
// Varlen: cu_seqlens may be given, as in the dQ kernel (bwd_dq_kernel.h): blocks past the sequence's last
// key leave at once, and dK, dV tiles that cross it are stored by rows.
// AtomicDq: Traits is a BwdDkdvAtomicDqTraits; off, the split backward's kernel, unchanged.
// General: mask.h's (in translation units of their own, bwd_launch.h run_bwd_dkdv_general); not with AtomicDq.
template <class Traits, bool Windowed, bool Varlen, bool AtomicDq = false, bool General = false>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_dkdv_kernel(__grid_constant__ const typename Traits::KernelParams kp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma and setmaxnreg exist in sm_90a code only
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  extern __shared__ char smem[];
  auto &shared = *reinterpret_cast<typename Traits::SharedStorage *>(smem);
  BwdParams const &params = kp.params;
  int const n_block = blockIdx.x, batch = blockIdx.y, head = blockIdx.z;

  BlockInfo const seq{params, batch, cute::bool_constant<Varlen>{}};
  if constexpr (Varlen) {
    if (n_block * kBlockN >= seq.seqlen_k) { return; }  // the grid covers the longest sequence: the whole block leaves
  }
  static_assert(!(AtomicDq && General), "the atomic dQ's kernel has the common variant only");
  using ScoreMask = Mask<kBlockM, kBlockN, Windowed, General>;
  ScoreMask const mask{params, seq, head};  // (query, key) blocks
  int const m_block_begin = mask.m_block_begin(n_block), m_block_end = mask.m_block_end(n_block);
  bool const has_queries = m_block_end > m_block_begin;  // else dK = dV = 0 (causal keys past the last query)

  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutK{});
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});      // (M, D, stages)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});    // (D, M, stages)
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQt{});

  int const warpgroup = cutlass::canonical_warp_group_idx();  // 0: producer
  bool const producer = warpgroup == 0;
  if (threadIdx.x == 0) {
    prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_do.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&shared.kv_full, 1);
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = 2 * Traits::kTmaBytesQ;  // Q and dO
  pipeline_params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline(shared.pipeline_q, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers are initialised before anyone waits on them

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x == 0 && has_queries) {
      // TMA views (kernel_traits.h): rows past seqlen_q or seqlen_k and columns past head_dim land as zeros;
      // varlen, rows past the sequence's end are the next sequence's (unused queries, masked keys) or, past
      // the tensor's end, zeros.
      Tensor mQ = kp.tma_q.get_tma_tensor(tma_shape_q<Varlen>(params));
      Tensor mdO = kp.tma_do.get_tma_tensor(tma_shape_q<Varlen>(params));
      Tensor mK = kp.tma_k.get_tma_tensor(tma_shape_k<Varlen>(params));
      Tensor mV = kp.tma_v.get_tma_tensor(tma_shape_k<Varlen>(params));
      int const kv_head = params.kv_head(head);
      auto q_view = [&](auto const &m) { return sequence_rows<Varlen>(m, params, head, batch, seq.q_start); };
      auto k_view = [&](auto const &m) { return sequence_rows<Varlen>(m, params, kv_head, batch, seq.k_start); };
      Tensor gQ = local_tile(q_view(mQ), typename Traits::TileQ{}, make_coord(_, _0{}));  // (M, D, m)
      Tensor gdO = local_tile(q_view(mdO), typename Traits::TileQ{}, make_coord(_, _0{}));
      Tensor gK = local_tile(k_view(mK), typename Traits::TileK{}, make_coord(n_block, _0{}));
      Tensor gV = local_tile(k_view(mV), typename Traits::TileK{}, make_coord(n_block, _0{}));
      auto q_copy = tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto do_copy = tma_partition(kp.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      auto k_copy = tma_partition(kp.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto v_copy = tma_partition(kp.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.kv_full, 2 * Traits::kTmaBytesK);
      copy(kp.tma_k.with(shared.kv_full, 0), get<0>(k_copy), get<1>(k_copy));
      copy(kp.tma_v.with(shared.kv_full, 0), get<0>(v_copy), get<1>(v_copy));
      auto write = cutlass::make_producer_start_state<Pipeline>();
      for (int m_block = m_block_begin; m_block < m_block_end; ++m_block) {
        pipeline.producer_acquire(write);
        auto *full = pipeline.producer_get_barrier(write);
        copy(kp.tma_q.with(*full, 0), get<0>(q_copy)(_, m_block), get<1>(q_copy)(_, write.index()));
        copy(kp.tma_do.with(*full, 0), get<0>(do_copy)(_, m_block), get<1>(do_copy)(_, write.index()));
        ++write;
      }
    }
    return;  // the consumers keep the block, and its shared memory, alive until the last load has landed
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  int const thread_idx = threadIdx.x - cutlass::NumThreadsPerWarpGroup;
  typename Traits::TiledMmaSt mma_st;
  typename Traits::TiledMmaDkv mma_dkv;
  // (MMA, MMA_M, MMA_N): this warpgroup's 64 keys.
  Tensor acc_dk = partition_fragment_C(mma_dkv, typename Traits::TileK{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, typename Traits::TileK{});
  clear(acc_dk);
  clear(acc_dv);

  if (has_queries) {
    auto thr_st = mma_st.get_thread_slice(thread_idx);
    auto thr_dkv = mma_dkv.get_thread_slice(thread_idx);
    // K's and V's descriptors (MMA, MMA_M, MMA_K) depend on the warpgroup only: taken from its first
    // thread's slice, with canonical_warp_group_idx() known to be warp-uniform, they stay in uniform
    // registers; from thread_idx's the compiler kept them in 32 registers and spilled.
    auto thr_st_wg = mma_st.get_thread_slice((warpgroup - 1) * cutlass::NumThreadsPerWarpGroup);
    Tensor tSrK = thr_st_wg.partition_fragment_A(sK);
    Tensor tdPrV = thr_st_wg.partition_fragment_A(sV);
    // With Traits::kDescPerStep they are rebuilt in every step, from a pointer the compiler cannot see
    // through, instead of hoisted out of the loop: at D = 128 the hoisted 16 x 64 bits overflowed the
    // uniform registers and spilled.
    auto operand_kv = [&](auto const &hoisted, Element *ptr) __attribute__((always_inline)) -> decltype(auto) {
      if constexpr (Traits::kDescPerStep) {
        asm volatile("" : "+l"(ptr));
        return thr_st_wg.partition_fragment_A(make_tensor(make_smem_ptr(ptr), typename Traits::SmemLayoutK{}));
      } else {
        return (hoisted);
      }
    };
    Tensor tSrQ = thr_st.partition_fragment_B(sQ);     // (MMA, MMA_N, MMA_K, stages)
    Tensor tdPrdO = thr_st.partition_fragment_B(sdO);
    Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);  // (MMA, MMA_N, MMA_K, stages)
    Tensor tdVrdO = thr_dkv.partition_fragment_B(sdOt);
    Tensor tScS = thr_st.partition_C(make_identity_tensor(typename Traits::TileSt{}));  // (key, query) of each score
    Tensor tScS_rc = make_tensor(tScS.data(), rows_cols(tScS.layout()));
    constexpr int kCols = decltype(size<1>(tScS_rc))::value;  // the query columns this thread holds
    Tensor mLSE = seq.q_values(params.lse, head);
    Tensor mD = seq.q_values(params.dpsum, head);
    float const scale_log2 = params.softmax_scale_log2;
    typename Traits::PipelineState read;
    // Overlap (tile_config.h): the previous step's dSᵀ and stage, whose dK product this step issues.
    typename Traits::PipelineState read_prev;
    Tensor rdS_prev = make_tensor<Element>(partition_fragment_C(mma_st, typename Traits::TileSt{}).layout());
    auto issue_dk = [&](int stage) __attribute__((always_inline)) {
      gemm_issue<false>(mma_dkv, make_tensor(rdS_prev.data(), acc_as_operand_a(rdS_prev.layout())),
                        tdKrQ(_, _, _, stage), acc_dk);
    };
    // Once the previous dK product is done: it has read its stage's Q, and rdS_prev.
    auto release_prev = [&]() __attribute__((always_inline)) {
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(rdS_prev);
      pipeline.consumer_release(read_prev);
    };
    // Prefetch (tile_config.h): a query block's LSE (log2 units) and D, read a step ahead into registers.
    float lse_next[kCols], dpsum_next[kCols];
    auto load_rows = [&](int m_block, float(&lse_log2)[kCols], float(&dpsum)[kCols]) __attribute__((always_inline)) {
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        int const query = m_block * kBlockM + get<1>(tScS_rc(0, c));
        bool const in_range = query < seq.seqlen_q;  // also past the last step's block: its reads are unused
        lse_log2[c] = in_range ? mLSE(query) * float(M_LOG2E) : INFINITY;
        dpsum[c] = in_range ? mD(query) : 0.f;
      }
    };
    if constexpr (Traits::kPrefetchRows) { load_rows(m_block_begin, lse_next, dpsum_next); }
    cutlass::arch::ClusterTransactionBarrier::wait(&shared.kv_full, 0);
    auto add_dq = [&](auto const &rdS, int m_block) __attribute__((always_inline)) {
      if constexpr (AtomicDq) {
        BwdDqAtomic<Traits>{shared.ds.data(), shared.k.data(), warpgroup - 1, thread_idx}.add(mma_st, rdS, m_block,
                                                                                             params, seq, head);
      }
    };

    // has_prev: overlap, and not the first step (a compile-time tag: warpgroup_wait's count depends on it).
    auto step = [&](int m_block, auto is_masked, auto has_prev) __attribute__((always_inline)) {
      constexpr bool kHasPrev = decltype(has_prev)::value;
      constexpr bool kBeforeS = kHasPrev && Traits::kOverlap == 2, kAfterS = kHasPrev && Traits::kOverlap == 1;
      pipeline.consumer_wait(read);
      int const stage = read.index();
      Tensor acc_s = partition_fragment_C(mma_st, typename Traits::TileSt{});   // Sᵀ: (MMA, MMA_M, MMA_N)
      Tensor acc_dp = partition_fragment_C(mma_st, typename Traits::TileSt{});  // dPᵀ
      if constexpr (kBeforeS) { issue_dk(read_prev.index()); }
      gemm_issue<true>(mma_st, operand_kv(tSrK, shared.k.data()), tSrQ(_, _, _, stage), acc_s);
      // After Sᵀ, so that the exponentials wait for Sᵀ only; before dPᵀ, so that its wait below (in order)
      // frees the previous stage before dPᵀ's.
      if constexpr (kAfterS) { issue_dk(read_prev.index()); }
      gemm_issue<true>(mma_st, operand_kv(tdPrV, shared.v.data()), tdPrdO(_, _, _, stage), acc_dp);
      // The keep bits of this Sᵀ tile (rows keys, columns queries; one register: 64 x kBlockM per warpgroup),
      // kept for Pᵀ and dPᵀ, made while both products run (made before them, at D = 128 it spilled more).
      [[maybe_unused]] KeepMask<decltype(tScS)> keep{};  // used by the general variant only
      if constexpr (General) {
        if (params.has_dropout()) {
          keep = Dropout{params, batch, head}.template keep_mask<true, true>(tScS, n_block * kBlockN,
                                                                             m_block * kBlockM);
        }
      }
      // Each column is a query: its LSE (log2 units) and, later, D, read from global memory (L2) while a
      // matmul runs; D only once Pᵀ is made, so that the two arrays are not live at once (together with
      // LSE, the D = 128 kernel spilled). Past seqlen_q, LSE +inf makes P = 0 (Q and dO are zeros there).
      // With Traits::kPrefetchRows, both came with the previous step and the next step's are read now.
      auto query_of = [&](int c) { return m_block * kBlockM + get<1>(tScS_rc(0, c)); };
      auto load_lse = [&](float(&lse)[kCols]) __attribute__((always_inline)) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          lse[c] = query_of(c) < seq.seqlen_q ? mLSE(query_of(c)) * float(M_LOG2E) : INFINITY;
        }
      };
      float lse_log2[kCols], dpsum[kCols];
      if constexpr (Traits::kPrefetchRows) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) { lse_log2[c] = lse_next[c], dpsum[c] = dpsum_next[c]; }
        load_rows(m_block + 1, lse_next, dpsum_next);
      } else {
        load_lse(lse_log2);
      }
      warpgroup_wait<kAfterS ? 2 : 1>();  // Sᵀ is in (in order: so is a dK product issued before it)
      if constexpr (kBeforeS) { release_prev(); }
      warpgroup_fence_operand(acc_s);
      mask.template apply<decltype(is_masked)::value, true>(acc_s, tScS, m_block, n_block);
      Tensor p = make_tensor(acc_s.data(), rows_cols(acc_s.layout()));  // Pᵀ = exp(Sᵀ·scale - LSE), in place
      CUTE_UNROLL
      for (int r = 0; r < size<0>(p); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) { p(r, c) = exp2_approx(p(r, c) * scale_log2 - lse_log2[c]); }
      }
      if constexpr (kAfterS) {
        warpgroup_wait<1>();  // the previous dK product is done; dPᵀ still runs
        release_prev();
      }
      Tensor rP = convert_type<Element>(acc_s);
      if constexpr (General) {  // the Pᵀ that dV takes: dropped entries 0 (exact in 16 bits); 1 / (1 - p) at the end
        if (params.has_dropout()) { zero_dropped(keep, rP); }
      }
      gemm_issue<false>(mma_dkv, make_tensor(rP.data(), acc_as_operand_a(rP.layout())), tdVrdO(_, _, _, stage),
                        acc_dv);
      if constexpr (!Traits::kPrefetchRows) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) { dpsum[c] = query_of(c) < seq.seqlen_q ? mD(query_of(c)) : 0.f; }
      }
      warpgroup_wait<1>();  // dPᵀ is in; dV += Pᵀ·dO still runs
      warpgroup_fence_operand(acc_dp);
      if constexpr (General) {
        if (params.has_dropout()) { apply_keep_mask(keep, acc_dp, params.dropout_scale); }
      }
      Tensor ds = make_tensor(acc_dp.data(), rows_cols(acc_dp.layout()));  // dSᵀ = Pᵀ∘(dPᵀ - D), in place
      CUTE_UNROLL
      for (int r = 0; r < size<0>(ds); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) { ds(r, c) = p(r, c) * (ds(r, c) - dpsum[c]); }
      }
      if constexpr (General) {
        // Softcap's derivative takes LSE again (mask.h chain_rule): read anew (L2) rather than kept live from
        // Pᵀ across dV's product and dSᵀ, beside which the D = 128 kernel spilled.
        if (params.softcap_premul != 0.f) {
          load_lse(lse_log2);
          mask.template chain_rule<true>(acc_dp, acc_s, lse_log2, tScS, m_block, n_block);
        }
      }
      if constexpr (Traits::kOverlap != 0) {
        // dK's product goes out in the next step (or after the loop), and this stage is released once it has
        // run. dV's, issued before dSᵀ was made, is waited for here: left in flight, it kept Pᵀ's registers
        // taken across the steps' boundary, and at D = 128 ptxas serialized the wgmma for want of registers.
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_dv);
        copy(convert_type<Element>(acc_dp), rdS_prev);
        add_dq(rdS_prev, m_block);
        read_prev = read;
      } else {
        Tensor rdS = convert_type<Element>(acc_dp);
        gemm_issue<false>(mma_dkv, make_tensor(rdS.data(), acc_as_operand_a(rdS.layout())), tdKrQ(_, _, _, stage),
                          acc_dk);
        add_dq(rdS, m_block);  // beside dK's product
        warpgroup_wait<0>();  // both products have read this stage's Q and dO
        warpgroup_fence_operand(acc_dv);
        warpgroup_fence_operand(acc_dk);
        pipeline.consumer_release(read);
      }
      ++read;
    };

    // Query blocks from the first that sees these keys up: those the causal diagonal crosses (all of them
    // for a ragged last key block) masked first, those the left edge crosses (General) masked last, the rest
    // not (mask.h).
    int const m_block_end_masked = min(m_block_end, mask.m_block_end_masked(n_block));
    // Without the left edge, m_block_end itself: min(m_block_end, INT_MAX) changed the common kernels' SASS.
    int m_block_unmasked_end = m_block_end;
    if constexpr (ScoreMask::kLeftEdge) { m_block_unmasked_end = min(m_block_end, mask.m_block_first_masked(n_block)); }
    int m_block = m_block_begin;
    if constexpr (Traits::kOverlap != 0) {  // the first step has no previous dK product to issue
      bool masked = m_block < m_block_end_masked;
      if constexpr (ScoreMask::kLeftEdge) { masked = masked || m_block >= m_block_unmasked_end; }
      if (masked) {
        step(m_block, cute::true_type{}, cute::false_type{});
      } else {
        step(m_block, cute::false_type{}, cute::false_type{});
      }
      ++m_block;
    }
    constexpr auto has_prev = cute::bool_constant<Traits::kOverlap != 0>{};
    for (; m_block < m_block_end_masked; ++m_block) { step(m_block, cute::true_type{}, has_prev); }
    for (; m_block < m_block_unmasked_end; ++m_block) { step(m_block, cute::false_type{}, has_prev); }
    if constexpr (ScoreMask::kLeftEdge) {
      for (; m_block < m_block_end; ++m_block) { step(m_block, cute::true_type{}, has_prev); }
    }
    if constexpr (Traits::kOverlap != 0) {  // the last step's dK product
      issue_dk(read_prev.index());
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(acc_dk);
      pipeline.consumer_release(read_prev);
    }
  }
  if constexpr (AtomicDq) { BwdDqAtomic<Traits>::release_k(); }

  // dK (w.r.t. the scaled scores: the scale comes in once, here) and dV through K's and V's buffers and a TMA
  // store each, which clips the rows past seqlen_k and the columns past head_dim (varlen: past the tensor's
  // end only, so that a tile crossing its sequence's end is stored by rows). Each warpgroup writes only its
  // own 64 rows, which only its own matmuls read, and those have finished.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= params.softmax_scale; }
  if constexpr (General) {
    if (params.has_dropout()) {  // dV took the dropped Pᵀ unscaled
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dv); ++i) { acc_dv(i) *= params.dropout_scale; }
    }
  }
  auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_dkv);
  auto thr_copy = smem_copy.get_thread_slice(thread_idx);
  Tensor rdK = convert_type<Element>(acc_dk);
  Tensor rdV = convert_type<Element>(acc_dv);
  copy(smem_copy, thr_copy.retile_S(rdK), thr_copy.partition_D(sK));
  copy(smem_copy, thr_copy.retile_S(rdV), thr_copy.partition_D(sV));
  cutlass::arch::fence_view_async_shared();  // the generic-proxy writes, visible to the TMA engine
  barrier_sync(Traits::kConsumerThreads, BwdBarrier::GradsReady);
  if constexpr (Varlen) {
    if (tma_varlen<Varlen>(params) && (n_block + 1) * kBlockN > seq.seqlen_k) {
      // dK and dV are per query head (flash.h): rows of k's sequence, q's head.
      Tensor gdK = local_tile(seq.template k_rows<Traits::kHeadDim, Element>(params.dk, head), typename Traits::TileK{},
                              make_coord(n_block, _0{}));  // (kBlockN, kHeadDim)
      Tensor gdV = local_tile(seq.template k_rows<Traits::kHeadDim, Element>(params.dv, head), typename Traits::TileK{},
                              make_coord(n_block, _0{}));
      int const rows_left = seq.seqlen_k - n_block * kBlockN;
      Traits::RowStore::store(sK, gdK, rows_left, params.head_dim, thread_idx);
      Traits::RowStore::store(sV, gdV, rows_left, params.head_dim, thread_idx);
      return;
    }
  }
  if (thread_idx == 0) {
    Tensor mdK = kp.tma_dk.get_tma_tensor(tma_shape_dk<Varlen>(params));
    Tensor mdV = kp.tma_dv.get_tma_tensor(tma_shape_dk<Varlen>(params));
    Tensor gdK = local_tile(sequence_rows<Varlen>(mdK, params, head, batch, seq.k_start), typename Traits::TileK{},
                            make_coord(n_block, _0{}));
    Tensor gdV = local_tile(sequence_rows<Varlen>(mdV, params, head, batch, seq.k_start), typename Traits::TileK{},
                            make_coord(n_block, _0{}));
    auto dk_copy = tma_partition(kp.tma_dk, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gdK));
    auto dv_copy = tma_partition(kp.tma_dv, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gdV));
    copy(kp.tma_dk, get<1>(dk_copy), get<0>(dk_copy));  // (gmem, smem) views: smem -> gmem
    copy(kp.tma_dv, get<1>(dv_copy), get<0>(dv_copy));
    tma_store_arrive();
    tma_store_wait<0>();  // shared memory stays ours until the stores have read it
  }
#endif
}

}  // namespace flash::sm90
