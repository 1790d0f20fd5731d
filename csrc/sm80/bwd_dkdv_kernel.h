// Backward dK/dV kernel: one thread block per (key block, batch, query head) loops over the query
// blocks that see its keys. It computes the transposed tiles Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, so that with
// warps stacked along the keys (kWarpsN = 1) Pᵀ and dSᵀ come out of the accumulators already laid out as
// the A operand of dV += Pᵀ·dO and dK += dSᵀ·Q: no trip through shared memory. With kWarpsN > 1 (large
// head dims, where one warp cannot hold a whole row of dK and dV) the warps also split the columns, so
// each holds only part of its rows' Pᵀ and dSᵀ: those go through shared memory, still computed once.
// Q, dO, LSE and D are double-buffered. With dropout (General only; bwd_dq_kernel.h derives it), dV takes
// the dropped Pᵀ (its 1 / (1 - p) applied once to dV) and dSᵀ the undropped Pᵀ with the masked, rescaled
// dPᵀ; the keep mask is made once per step (dropout.h: the Sᵀ layout costs no more calls) and kept as bits.
// AtomicDq (the non-deterministic backward, FlashAttention-2's Algorithm 2 unsplit): each step also takes
// this query block's share of dQ, dS·K, from dSᵀ in shared memory (with kWarpsN = 1 it goes there only
// for this) and K, and adds it into the fp32 params.dq_accum with atomics: 5 matmuls in all, no dQ kernel.
// The order of those adds varies from run to run, so dQ's last bits do.
#pragma once

#include <cute/tensor.hpp>

#include "common/block_info.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/utils.h"

#include "epilogue.h"
#include "gemm.h"
#include "kernel_traits.h"
#include "tile_copy.h"

namespace flash {

using namespace cute;

// K, V; 2 x (Q, dO); 2 x (LSE, D); with kWarpsN > 1, Pᵀ and dSᵀ; with AtomicDq, dSᵀ.
template <class Traits, bool AtomicDq = false>
constexpr int bwd_dkdv_smem_size() {
  bool const share_p = Traits::kWarpsN > 1;
  int const tiles = int(share_p) + int(share_p || AtomicDq);
  int const p_ds = tiles * Traits::kBlockM * Traits::kBlockN * int(sizeof(typename Traits::Element));
  return 2 * Traits::kSmemSizeM + 4 * Traits::kSmemSizeN + 4 * Traits::kBlockN * int(sizeof(float)) + p_ds;
}

template <class Traits, bool Windowed, bool General, bool AtomicDq = false>  // mask.h, fwd_kernel.h; AtomicDq above
__global__ void __launch_bounds__(Traits::kNThreads) bwd_dkdv_kernel(__grid_constant__ const BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;  // keys this block owns
  constexpr int kBlockN = Traits::kBlockN;  // queries per step
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr bool kShareP = Traits::kWarpsN > 1;  // Pᵀ and dSᵀ through shared memory
  static_assert(Traits::kNThreads >= 2 * kBlockN, "one thread per LSE and per D value of a query block");
  using TileM = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileN = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileNt = Shape<Int<kHeadDim>, Int<kBlockN>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;  // Sᵀ: (keys, queries)
  using SmemLayoutN = typename Traits::SmemLayoutN;

  int const n_block = blockIdx.x;
  int const batch = blockIdx.y, head = blockIdx.z;
  int const tid = threadIdx.x;

  BlockInfo const seq{params, batch, cute::bool_constant<General>{}};
  int const k_rows_left = seq.seqlen_k - n_block * kBlockM;
  if (k_rows_left <= 0) { return; }  // varlen: the grid is sized for the longest sequence
  Mask<kBlockN, kBlockM, Windowed, General> const mask{params, seq, head};  // (query, key) blocks
  int const m_block_begin = mask.m_block_begin(n_block), m_block_end = mask.m_block_end(n_block);
  bool const dropout_on = General && params.has_dropout();
  constexpr bool kPaired = Traits::kWarpsN == 1;  // dropout.h

  Tensor mK = seq.k_rows<kHeadDim, Element const>(params.k, params.kv_head(head));
  Tensor mV = seq.k_rows<kHeadDim, Element const>(params.v, params.kv_head(head));
  Tensor mQ = seq.q_rows<kHeadDim, Element const>(params.q, head);
  Tensor mdO = seq.q_rows<kHeadDim, Element const>(params.dout, head);
  Tensor mdK = seq.k_rows<kHeadDim, Element>(params.dk, head);
  Tensor mdV = seq.k_rows<kHeadDim, Element>(params.dv, head);
  Tensor mLSE = seq.q_values(params.lse, head);
  Tensor mD = seq.q_values(params.dpsum, head);
  Tensor gK = local_tile(mK, TileM{}, make_coord(n_block, 0));         // (kBlockM, kHeadDim)
  Tensor gV = local_tile(mV, TileM{}, make_coord(n_block, 0));         // (kBlockM, kHeadDim)
  Tensor gQ = local_tile(mQ, TileN{}, make_coord(_, 0));               // (kBlockN, kHeadDim, m)
  Tensor gdO = local_tile(mdO, TileN{}, make_coord(_, 0));             // (kBlockN, kHeadDim, m)
  Tensor gdK = local_tile(mdK, TileM{}, make_coord(n_block, 0));        // (kBlockM, kHeadDim)
  Tensor gdV = local_tile(mdV, TileM{}, make_coord(n_block, 0));        // (kBlockM, kHeadDim)

  // Shared memory: K, V, then two stages of (Q, dO), then two stages of (LSE, D), then Pᵀ and dSᵀ.
  extern __shared__ char smem[];
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), typename Traits::SmemLayoutM{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutM{});
  auto sQ = [&](int stage) { return make_tensor(sV.data() + size(sV) + (2 * stage) * cosize(SmemLayoutN{}), SmemLayoutN{}); };
  auto sdO = [&](int stage) { return make_tensor(sQ(stage).data() + cosize(SmemLayoutN{}), SmemLayoutN{}); };
  // Qᵀ and dOᵀ: (kHeadDim, kBlockN), the B operands of dK and dV.
  auto sQt = [&](int stage) { return make_tensor(sQ(stage).data(), typename Traits::SmemLayoutNt{}); };
  auto sdOt = [&](int stage) { return make_tensor(sdO(stage).data(), typename Traits::SmemLayoutNt{}); };
  float *const smem_stats = reinterpret_cast<float *>(smem + 2 * Traits::kSmemSizeM + 4 * Traits::kSmemSizeN);
  auto sLSE = [&](int stage) { return smem_stats + (2 * stage) * kBlockN; };
  auto sD = [&](int stage) { return smem_stats + (2 * stage + 1) * kBlockN; };
  Tensor sPt = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem_stats + 4 * kBlockN)),
                           SmemTile<kBlockM, kBlockN>{});  // (keys, queries); used when kShareP
  Tensor sdSt = make_tensor(sPt.data() + (kShareP ? size(sPt) : 0), SmemTile<kBlockM, kBlockN>{});  // kShareP, AtomicDq

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc_dk = partition_fragment_C(tiled_mma, TileM{});  // (MMA, MMA_M, MMA_N)
  Tensor acc_dv = partition_fragment_C(tiled_mma, TileM{});
  clear(acc_dk);
  clear(acc_dv);
  // dK, dV go out through K's and V's buffers once the loop is done.
  auto store = [&] {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= params.softmax_scale; }  // dS was w.r.t. scaled scores
    if (dropout_on) {  // dV took the dropped Pᵀ unscaled
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dv); ++i) { acc_dv(i) *= params.dropout_scale; }
    }
    store_acc_tile<Traits>(tiled_mma, acc_dk, sK, gdK, k_rows_left, params.head_dim);
    store_acc_tile<Traits>(tiled_mma, acc_dv, sV, gdV, k_rows_left, params.head_dim);
  };
  if (m_block_begin >= m_block_end) {  // no query sees these keys
    store();
    return;
  }

  typename Traits::GmemTiledCopyLoad gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_N, CPY_K, m)
  Tensor tdOgdO = gmem_thr_copy.partition_S(gdO);
  Tensor tKcK = gmem_thr_copy.partition_S(make_identity_tensor(TileM{}));
  Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(TileN{}));
  // Q, dO, LSE and D of query block m_block into a stage. Rows past seqlen_q arrive as zeros: with dO
  // and D zero there, such a query adds nothing to dV or dK.
  auto load_queries = [&](int m_block, int stage) {
    int const rows = seq.seqlen_q - m_block * kBlockN;
    load_tile<true>(gmem_copy, tQgQ(_, _, _, m_block), gmem_thr_copy.partition_D(sQ(stage)), tQcQ, rows,
                    params.head_dim);
    load_tile<true>(gmem_copy, tdOgdO(_, _, _, m_block), gmem_thr_copy.partition_D(sdO(stage)), tQcQ, rows,
                    params.head_dim);
    if (tid < 2 * kBlockN) {
      int const row = tid % kBlockN;
      float const *src = (tid < kBlockN ? mLSE : mD).data().get() + m_block * kBlockN + row;
      float *dst = (tid < kBlockN ? sLSE(stage) : sD(stage)) + row;
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(*reinterpret_cast<uint32_t const *>(src),
                                                     *reinterpret_cast<uint32_t *>(dst), row < rows);
    }
  };

  // Operands: K and V are A (rows of this block), Q and dO are B, Qᵀ and dOᵀ the B of dK and dV.
  Tensor tSrK = make_tensor<Element>(partition_shape_A(tiled_mma, TileM{}));
  Tensor tdPrV = make_tensor<Element>(partition_shape_A(tiled_mma, TileM{}));
  Tensor tSrQ = make_tensor<Element>(partition_shape_B(tiled_mma, TileN{}));
  Tensor tdPrdO = make_tensor<Element>(partition_shape_B(tiled_mma, TileN{}));
  Tensor tdKrQt = make_tensor<Element>(partition_shape_B(tiled_mma, TileNt{}));
  Tensor tdVrdOt = make_tensor<Element>(partition_shape_B(tiled_mma, TileNt{}));
  Tensor tdVrPt = make_tensor<Element>(partition_shape_A(tiled_mma, TileS{}));  // when kShareP
  Tensor tdKrdSt = make_tensor<Element>(partition_shape_A(tiled_mma, TileS{}));
  auto smem_copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_copy_acc = make_tiled_copy_C(typename Traits::SmemCopyAtomAcc{}, tiled_mma);
  Tensor tSsK = smem_copy_a.get_thread_slice(tid).partition_S(sK);
  Tensor tdPsV = smem_copy_a.get_thread_slice(tid).partition_S(sV);
  Tensor tdVsPt = smem_copy_a.get_thread_slice(tid).partition_S(sPt);
  Tensor tdKsdSt = smem_copy_a.get_thread_slice(tid).partition_S(sdSt);
  Tensor tPsPt = smem_copy_acc.get_thread_slice(tid).partition_D(sPt);
  Tensor tPsdSt = smem_copy_acc.get_thread_slice(tid).partition_D(sdSt);

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));  // (key, query) of each score
  Tensor tScS_rc = make_tensor(tScS.data(), rows_cols(tScS.layout()));

  load_tile<true>(gmem_copy, gmem_thr_copy.partition_S(gK), gmem_thr_copy.partition_D(sK), tKcK, k_rows_left,
                  params.head_dim);
  load_tile<true>(gmem_copy, gmem_thr_copy.partition_S(gV), gmem_thr_copy.partition_D(sV), tKcK, k_rows_left,
                  params.head_dim);
  load_queries(m_block_begin, 0);
  cp_async_fence();

  // AtomicDq: dQ[m_block] += dS·K·scale, from dSᵀ in shared memory (every warp's part in: the caller's barrier)
  // and K, into the fp32 accumulator; rows past seqlen_q and columns past head_dim are not touched. (Taken in
  // column slices, to keep fewer accumulators live, it spilled more: benchmarks/NOTES.md.)
  auto add_dq = [&](int m_block) __attribute__((always_inline)) {
    if constexpr (AtomicDq) {
      Tensor sdS = make_tensor(sdSt.data(), SmemTileT<kBlockM, kBlockN>{});  // (kBlockN, kBlockM)
      Tensor sKt = make_tensor(sK.data(), SmemTileT<kBlockM, kHeadDim>{});   // (kHeadDim, kBlockM)
      auto smem_copy_at = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
      Tensor tdQrdS = make_tensor<Element>(partition_shape_A(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{}));
      Tensor tdQrKt = make_tensor<Element>(partition_shape_B(tiled_mma, Shape<Int<kHeadDim>, Int<kBlockM>>{}));
      Tensor acc_dq = partition_fragment_C(tiled_mma, TileN{});  // (MMA, MMA_M, MMA_N)
      clear(acc_dq);
      gemm_smem_smem(tiled_mma, acc_dq, tdQrdS, tdQrKt, smem_copy_at.get_thread_slice(tid).partition_S(sdS),
                     smem_copy_bt.get_thread_slice(tid).partition_S(sKt), smem_copy_at, smem_copy_bt);
      Tensor gdQaccum = local_tile(seq.q_rows<kHeadDim, float>(params.dq_accum, head), TileN{},
                                   make_coord(m_block, 0));  // (kBlockN, kHeadDim)
      Tensor tdQcdQ = thr_mma.partition_C(make_identity_tensor(TileN{}));
      int const rows = seq.seqlen_q - m_block * kBlockN;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) {
        int const row = get<0>(tdQcdQ(i)), col = get<1>(tdQcdQ(i));
        if (row < rows && col < params.head_dim) { atomicAdd(&gdQaccum(row, col), acc_dq(i) * params.softmax_scale); }
      }
    }
  };

  auto step = [&](int m_block, int stage, auto is_masked) __attribute__((always_inline)) {
    cp_async_wait<0>();
    __syncthreads();  // this stage has landed, and every warp is done with the other one
    if (m_block + 1 < m_block_end) {
      load_queries(m_block + 1, stage ^ 1);
      cp_async_fence();
    }
    // The keep bits of this Sᵀ tile (rows keys, columns queries), kept for Pᵀ and dPᵀ: made here, where only
    // dK and dV are live (beside Sᵀ and dPᵀ the general variant spilled twice as much: benchmarks/NOTES.md).
    [[maybe_unused]] KeepMask<decltype(tScS)> keep{};  // used by the general variant only
    if constexpr (General) {
      if (dropout_on) {
        keep = Dropout{params, batch, head}.template keep_mask<true, kPaired>(tScS, n_block * kBlockM,
                                                                              m_block * kBlockN);
      }
    }

    Tensor acc_s = partition_fragment_C(tiled_mma, TileS{});  // Sᵀ: (MMA, MMA_M, MMA_N)
    clear(acc_s);
    gemm_smem_smem(tiled_mma, acc_s, tSrK, tSrQ, tSsK, smem_copy_b.get_thread_slice(tid).partition_S(sQ(stage)),
                   smem_copy_a, smem_copy_b);
    mask.template apply<decltype(is_masked)::value, true>(acc_s, tScS, m_block, n_block);
    // Each column is a query: its LSE (log2 units) and D, read once per step from shared memory.
    constexpr int kCols = decltype(size<1>(tScS_rc))::value;
    float lse_log2[kCols], dpsum[kCols];
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      int const col = get<1>(tScS_rc(0, c));
      lse_log2[c] = sLSE(stage)[col] * float(M_LOG2E);
      dpsum[c] = sD(stage)[col];
    }
    Tensor p = make_tensor(acc_s.data(), rows_cols(acc_s.layout()));  // Pᵀ = exp(Sᵀ·scale - LSE), in place
    CUTE_UNROLL
    for (int r = 0; r < size<0>(p); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) { p(r, c) = exp2_approx(p(r, c) * params.softmax_scale_log2 - lse_log2[c]); }
    }
    Tensor rP = convert_type<Element>(acc_s);
    if constexpr (General) {  // the Pᵀ that dV takes: dropped entries 0 (exact in 16 bits); 1 / (1 - p) at the end
      if (dropout_on) { zero_dropped(keep, rP); }
    }
    if constexpr (kShareP) { copy(smem_copy_acc, smem_copy_acc.get_thread_slice(tid).retile_S(rP), tPsPt); }

    Tensor acc_dp = partition_fragment_C(tiled_mma, TileS{});  // dPᵀ = V·dOᵀ
    clear(acc_dp);
    gemm_smem_smem(tiled_mma, acc_dp, tdPrV, tdPrdO, tdPsV, smem_copy_b.get_thread_slice(tid).partition_S(sdO(stage)),
                   smem_copy_a, smem_copy_b);
    Tensor tdVsdOt = smem_copy_bt.get_thread_slice(tid).partition_S(sdOt(stage));
    if constexpr (!kShareP) {  // dV now: its B loads overlap the dSᵀ arithmetic below
      gemm_reg_smem(tiled_mma, acc_dv, make_tensor(rP.data(), acc_as_operand_a(rP.layout())), tdVrdOt, tdVsdOt,
                    smem_copy_bt);
    }

    if constexpr (General) {
      if (dropout_on) { apply_keep_mask(keep, acc_dp, params.dropout_scale); }
    }
    Tensor ds = make_tensor(acc_dp.data(), rows_cols(acc_dp.layout()));  // dSᵀ = Pᵀ∘(dPᵀ - D), in place
    CUTE_UNROLL
    for (int r = 0; r < size<0>(ds); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) { ds(r, c) = p(r, c) * (ds(r, c) - dpsum[c]); }
    }
    mask.template chain_rule<true>(acc_dp, acc_s, lse_log2, tScS, m_block, n_block);
    Tensor rdS = convert_type<Element>(acc_dp);
    Tensor tdKsQt = smem_copy_bt.get_thread_slice(tid).partition_S(sQt(stage));
    if constexpr (!kShareP) {
      if constexpr (AtomicDq) { copy(smem_copy_acc, smem_copy_acc.get_thread_slice(tid).retile_S(rdS), tPsdSt); }
      gemm_reg_smem(tiled_mma, acc_dk, make_tensor(rdS.data(), acc_as_operand_a(rdS.layout())), tdKrQt, tdKsQt,
                    smem_copy_bt);
      if constexpr (AtomicDq) {
        __syncthreads();  // every warp's dSᵀ is in; the next step's first barrier guards its reuse
        add_dq(m_block);
      }
    } else {
      copy(smem_copy_acc, smem_copy_acc.get_thread_slice(tid).retile_S(rdS), tPsdSt);
      __syncthreads();  // every warp's part of Pᵀ and dSᵀ is in; the next step's first barrier guards reuse
      gemm_smem_smem(tiled_mma, acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, smem_copy_a, smem_copy_bt);
      gemm_smem_smem(tiled_mma, acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, smem_copy_a, smem_copy_bt);
      add_dq(m_block);
    }
  };

  // Query blocks from the first that sees these keys up: those the window's right edge (the causal
  // diagonal) crosses come first, those its left edge crosses last; both masked.
  int const m_block_end_masked = min(m_block_end, mask.m_block_end_masked(n_block));
  int const m_block_unmasked_end = min(m_block_end, mask.m_block_first_masked(n_block));
  int m_block = m_block_begin, stage = 0;
  for (; m_block < m_block_end_masked; ++m_block, stage ^= 1) { step(m_block, stage, cute::true_type{}); }
  for (; m_block < m_block_unmasked_end; ++m_block, stage ^= 1) { step(m_block, stage, cute::false_type{}); }
  if constexpr (Windowed && General) {
    for (; m_block < m_block_end; ++m_block, stage ^= 1) { step(m_block, stage, cute::true_type{}); }
  }
  store();
}

}  // namespace flash
