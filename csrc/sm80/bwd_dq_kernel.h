// Backward dQ kernel (FlashAttention-2, Algorithm 2, split as dQ | dK,dV): one thread block per
// (query block, batch, head) loops over the key blocks its rows see, recomputes S = Q·Kᵀ and
// P = exp(S·scale - LSE) from the saved LSE, then dP = dO·Vᵀ, dS = P∘(dP - D) and dQ += dS·K.
// With dropout (General only) the forward's output was (P∘Z / (1 - p))·V for its keep mask Z: dO·Vᵀ is the
// gradient of the dropped P, that of P itself is dO·Vᵀ∘Z / (1 - p), and D = rowsum(dO∘O) is still
// rowsum(P∘dP): dS = P∘(dO·Vᵀ∘Z / (1 - p) - D), with the undropped P.
// K and V blocks are double-buffered: the next pair streams in during the whole step.
#pragma once

#include <cute/tensor.hpp>

#include "common/block_info.h"
#include "common/d_rewrite.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/utils.h"

#include "epilogue.h"
#include "gemm.h"
#include "tile_copy.h"

namespace flash {

using namespace cute;

// Q, dO; 2 x (K, V).
template <class Traits>
constexpr int bwd_dq_smem_size() { return 2 * Traits::kSmemSizeM + 4 * Traits::kSmemSizeN; }

template <class Traits, bool Windowed, bool General>  // mask.h, fwd_kernel.h
__global__ void __launch_bounds__(Traits::kNThreads) bwd_dq_kernel(__grid_constant__ const BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileM = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileN = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  using SmemLayoutN = typename Traits::SmemLayoutN;

  int const m_block = gridDim.x - 1 - blockIdx.x;  // blocks with the most keys (causal) first
  int const batch = blockIdx.y, head = blockIdx.z;
  int const tid = threadIdx.x;

  BlockInfo const seq{params, batch, cute::bool_constant<General>{}};
  int const q_rows_left = seq.seqlen_q - m_block * kBlockM;
  if (q_rows_left <= 0) { return; }  // varlen: the grid is sized for the longest sequence
  Mask<kBlockM, kBlockN, Windowed, General> const mask{params, seq, head};
  int const n_block_begin = mask.n_block_begin(m_block), n_block_end = mask.n_block_end(m_block);
  bool const dropout_on = General && params.has_dropout();

  Tensor mQ = seq.q_rows<kHeadDim, Element const>(params.q, head);
  Tensor mdO = seq.q_rows<kHeadDim, Element const>(params.dout, head);
  Tensor mK = seq.k_rows<kHeadDim, Element const>(params.k, params.kv_head(head));
  Tensor mV = seq.k_rows<kHeadDim, Element const>(params.v, params.kv_head(head));
  Tensor mdQ = seq.q_rows<kHeadDim, Element>(params.dq, head);
  Tensor mLSE = seq.q_values(params.lse, head);
  Tensor mD = seq.q_values(params.dpsum, head);
  Tensor gQ = local_tile(mQ, TileM{}, make_coord(m_block, 0));    // (kBlockM, kHeadDim)
  Tensor gdO = local_tile(mdO, TileM{}, make_coord(m_block, 0));  // (kBlockM, kHeadDim)
  Tensor gK = local_tile(mK, TileN{}, make_coord(_, 0));          // (kBlockN, kHeadDim, n)
  Tensor gV = local_tile(mV, TileN{}, make_coord(_, 0));          // (kBlockN, kHeadDim, n)
  Tensor gdQ = local_tile(mdQ, TileM{}, make_coord(m_block, 0));  // (kBlockM, kHeadDim)
  Tensor gLSE = local_tile(mLSE, Shape<Int<kBlockM>>{}, make_coord(m_block));
  Tensor gD = local_tile(mD, Shape<Int<kBlockM>>{}, make_coord(m_block));

  // Shared memory: Q, dO, then two stages of (K, V).
  extern __shared__ char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), typename Traits::SmemLayoutM{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutM{});
  auto sK = [&](int stage) { return make_tensor(sdO.data() + size(sdO) + (2 * stage) * cosize(SmemLayoutN{}), SmemLayoutN{}); };
  auto sV = [&](int stage) { return make_tensor(sK(stage).data() + cosize(SmemLayoutN{}), SmemLayoutN{}); };
  auto sKt = [&](int stage) { return make_tensor(sK(stage).data(), typename Traits::SmemLayoutNt{}); };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc_dq = partition_fragment_C(tiled_mma, TileM{});  // (MMA, MMA_M, MMA_K)
  clear(acc_dq);
  if (n_block_end <= n_block_begin) {  // no row here sees a key: dQ = 0
    store_acc_tile<Traits>(tiled_mma, acc_dq, sQ, gdQ, q_rows_left, params.head_dim);
    return;
  }

  typename Traits::GmemTiledCopyLoad gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_M, CPY_K)
  Tensor tdOgdO = gmem_thr_copy.partition_S(gdO);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tVgV = gmem_thr_copy.partition_S(gV);
  Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(TileM{}));
  Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(TileN{}));
  auto load_kv = [&](int n_block, int stage, auto check_rows) {
    Tensor tKsK = gmem_thr_copy.partition_D(sK(stage));
    Tensor tVsV = gmem_thr_copy.partition_D(sV(stage));
    int const rows = seq.seqlen_k - n_block * kBlockN;
    load_tile<decltype(check_rows)::value>(gmem_copy, tKgK(_, _, _, n_block), tKsK, tKVcKV, rows, params.head_dim);
    load_tile<decltype(check_rows)::value>(gmem_copy, tVgV(_, _, _, n_block), tVsV, tKVcKV, rows, params.head_dim);
  };

  // Operands: Q and dO are A (rows of this block), K and V are B, Kᵀ is the B of dS·K.
  Tensor tSrQ = make_tensor<Element>(partition_shape_A(tiled_mma, TileM{}));
  Tensor tdPrdO = make_tensor<Element>(partition_shape_A(tiled_mma, TileM{}));
  Tensor tSrK = make_tensor<Element>(partition_shape_B(tiled_mma, TileN{}));
  Tensor tdPrV = make_tensor<Element>(partition_shape_B(tiled_mma, TileN{}));
  Tensor tdQrKt = make_tensor<Element>(partition_shape_B(tiled_mma, Shape<Int<kHeadDim>, Int<kBlockN>>{}));
  auto smem_copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = smem_copy_a.get_thread_slice(tid).partition_S(sQ);
  Tensor tdPsdO = smem_copy_a.get_thread_slice(tid).partition_S(sdO);

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));  // (row, col) of each score
  Tensor tScS_rc = make_tensor(tScS.data(), rows_cols(tScS.layout()));

  load_tile<true>(gmem_copy, tQgQ, gmem_thr_copy.partition_D(sQ), tQcQ, q_rows_left, params.head_dim);
  load_tile<true>(gmem_copy, tdOgdO, gmem_thr_copy.partition_D(sdO), tQcQ, q_rows_left, params.head_dim);
  load_kv(n_block_end - 1, 0, cute::true_type{});  // only the first key block visited can be ragged
  cp_async_fence();

  // This thread's rows: LSE in log2 units (+inf past seqlen_q, so P = 0 there) and D.
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  float lse_log2[kRows], dpsum[kRows];
  DRewrite<kRows> d_rewrite;  // rowsum(dS), rowsum(P) over every key the row sees, for D's rewrite (the end)
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    int const row = get<0>(tScS_rc(r, 0));
    bool const in_range = row < q_rows_left;
    lse_log2[r] = in_range ? gLSE(row) * float(M_LOG2E) : INFINITY;
    dpsum[r] = in_range ? gD(row) : 0.f;
  }

  auto step = [&](int n_block, int stage, auto is_masked) __attribute__((always_inline)) {
    cp_async_wait<0>();
    __syncthreads();  // K, V [n_block] have landed, and every warp is done with the other stage
    if (n_block > n_block_begin) {
      load_kv(n_block - 1, stage ^ 1, cute::false_type{});
      cp_async_fence();
    }
    // The keep bits (one register per 32 entries), made here, where only dQ's accumulator is live, as in
    // the dK/dV kernel.
    [[maybe_unused]] KeepMask<decltype(tScS)> keep{};  // used by the general variant only
    if constexpr (General) {
      if (dropout_on) {
        keep = Dropout{params, batch, head}.template keep_mask<false, Traits::kWarpsN == 1>(tScS, m_block * kBlockM,
                                                                                             n_block * kBlockN);
      }
    }

    Tensor acc_s = partition_fragment_C(tiled_mma, TileS{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, smem_copy_b.get_thread_slice(tid).partition_S(sK(stage)),
                   smem_copy_a, smem_copy_b);
    mask.template apply<decltype(is_masked)::value>(acc_s, tScS, m_block, n_block);
    Tensor p = make_tensor(acc_s.data(), rows_cols(acc_s.layout()));  // P = exp(S·scale - LSE), in place
    CUTE_UNROLL
    for (int r = 0; r < size<0>(p); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(p); ++c) { p(r, c) = exp2_approx(p(r, c) * params.softmax_scale_log2 - lse_log2[r]); }
    }

    Tensor acc_dp = partition_fragment_C(tiled_mma, TileS{});
    clear(acc_dp);
    gemm_smem_smem(tiled_mma, acc_dp, tdPrdO, tdPrV, tdPsdO, smem_copy_b.get_thread_slice(tid).partition_S(sV(stage)),
                   smem_copy_a, smem_copy_b);
    if constexpr (General) {
      if (dropout_on) { apply_keep_mask(keep, acc_dp, params.dropout_scale); }
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

    Tensor rdS = convert_type<Element>(acc_dp);
    Tensor tdQrdS = make_tensor(rdS.data(), acc_as_operand_a(rdS.layout()));
    gemm_reg_smem(tiled_mma, acc_dq, tdQrdS, tdQrKt, smem_copy_bt.get_thread_slice(tid).partition_S(sKt(stage)),
                  smem_copy_bt);
  };

  // Key blocks from the last down: the ragged ones and those the window's right edge crosses (masked) come
  // first, those its left edge crosses (masked) last.
  int const n_block_first_masked = mask.n_block_first_masked(m_block);
  int const n_block_unmasked_begin = mask.n_block_unmasked_begin(m_block);
  int n_block = n_block_end - 1, stage = 0;
  for (; n_block >= n_block_begin && n_block >= n_block_first_masked; --n_block, stage ^= 1) {
    step(n_block, stage, cute::true_type{});
  }
  for (; n_block >= n_block_begin && n_block >= n_block_unmasked_begin; --n_block, stage ^= 1) {
    step(n_block, stage, cute::false_type{});
  }
  if constexpr (Windowed && General) {
    for (; n_block >= n_block_begin; --n_block, stage ^= 1) { step(n_block, stage, cute::true_type{}); }
  }

  // dS was taken w.r.t. the scaled scores: the scale comes in once, here.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) { acc_dq(i) *= params.softmax_scale; }
  store_acc_tile<Traits>(tiled_mma, acc_dq, sQ, gdQ, q_rows_left, params.head_dim);

  // D rewritten as rowsum(P∘dP) (d_rewrite.h), after dQ, which keeps the D it was computed with.
  static_assert(Traits::kWarpsN == 1, "a row's columns are spread over one quad only");
  d_rewrite.store(dpsum, gD, tScS, q_rows_left);
}

}  // namespace flash
