// The forward kernel (FlashAttention-2, Algorithm 1): one thread block per (query block, batch, head);
// K and V blocks stream through shared memory while the warps, each owning a slice of the query rows,
// run Q·Kᵀ, the online softmax and P·V on tensor cores.
#pragma once

#include <cute/tensor.hpp>

#include "common/block_info.h"
#include "common/dropout.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/cache_layout.h"
#include "common/softmax.h"
#include "common/split_combine.h"
#include "common/utils.h"

#include "epilogue.h"
#include "gemm.h"
#include "tile_copy.h"

namespace flash {

using namespace cute;

// Q, K, V: one buffer each.
template <class Traits>
constexpr int fwd_smem_size() { return Traits::kSmemSizeM + 2 * Traits::kSmemSizeN; }

// General: the variant for varlen batches, softcap, ALiBi, windows with a left edge and dropout; the other,
// for the common case, compiles them out (each raises the D = 128 forward's spills several-fold:
// block_info.h, mask.h). So dropout adds no instantiation: 2 (Windowed) x 2 (General) per kernel, head dim
// and dtype, as before.
// KvCache: the variant behind flash_attn_with_kvcache (its own instantiations, fwd_launch.h): k and v are
// caches whose per-sequence lengths come from cache_seqlens (block_info.h), and with num_splits > 1 each
// block takes one split of the keys and writes a partial result for the combine kernel (split_combine.h).
// FusedCombine (KvCache with num_splits > 1 only; FLASH_ATTN2_DECODE_FUSED_COMBINE=1): the last split block
// of each tile does the combine itself (split_combine.h combine_in_last_split), no second launch.
template <class Traits, bool Windowed, bool General, bool KvCache = false, bool FusedCombine = false>
__global__ void __launch_bounds__(Traits::kNThreads) fwd_kernel(__grid_constant__ const FwdParams params) {
  static_assert(KvCache || !FusedCombine, "the fused combine is split-KV's, the KvCache variant's");
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;

  // Scheduler: the query blocks with the most keys (causal) start first, so the grid's tail is short.
  // Split-KV: blockIdx.x = m_block * num_splits + split.
  int const num_splits = KvCache ? params.num_splits : 1;
  int const m_block = KvCache ? blockIdx.x / num_splits : gridDim.x - 1 - blockIdx.x;
  int const split = KvCache ? blockIdx.x % num_splits : 0;
  int const batch = blockIdx.y, head = blockIdx.z;
  int const tid = threadIdx.x;

  if (General && params.has_dropout() && params.rng_state_out != nullptr && blockIdx.x == 0 && batch == 0 &&
      head == 0 && tid == 0) {
    // Under CUDA-graph capture only the device knows a replay's (seed, offset): the backward reads them here.
    uint64_t seed, offset;
    unpack_rng(params.rng, seed, offset);
    params.rng_state_out[0] = int64_t(seed);
    params.rng_state_out[1] = int64_t(offset);
  }

  BlockInfo const seq{params, batch, cute::bool_constant<General>{}, cute::bool_constant<KvCache>{}};
  int const q_rows_left = seq.seqlen_q - m_block * kBlockM;
  if (General && q_rows_left <= 0) { return; }  // varlen: the grid is sized for the longest sequence
  Mask<kBlockM, kBlockN, Windowed, General> const mask{params, seq, head};
  int n_block_begin = mask.n_block_begin(m_block), n_block_end = mask.n_block_end(m_block);
  if constexpr (KvCache) {  // this split's run of the visible key blocks (all of them without splits)
    int const per_split = ceil_div(max(n_block_end - n_block_begin, 0), num_splits);
    n_block_begin += split * per_split;
    n_block_end = min(n_block_end, n_block_begin + per_split);
  }
  bool const partial = KvCache && num_splits > 1;  // the result is one split's, for the combine kernel
  // Dropout (General only): P's dropped entries are zeroed before P·V, the kept ones' 1 / (1 - p) is applied
  // once to O; the row sums (and LSE) are those of the undropped P.
  bool const dropout_on = General && params.has_dropout();
  // A learnable sink's logit in log2 units, -inf for none: read only where the rows are finished, so that
  // it holds no register through the main loop.
  auto sink_log2 = [&] { return params.sinks == nullptr ? -INFINITY : params.sinks[head] * float(M_LOG2E); };

  Tensor mQ = seq.q_rows<kHeadDim, Element const>(params.q, head);
  Tensor mK = seq.k_rows<kHeadDim, Element const>(params.k, params.kv_head(head));
  Tensor mV = seq.k_rows<kHeadDim, Element const>(params.v, params.kv_head(head));
  Tensor mO = seq.q_rows<kHeadDim, Element>(params.o, head);
  Tensor mLSE = seq.q_values(params.lse, head);
  Tensor gQ = local_tile(mQ, TileQ{}, make_coord(m_block, 0));     // (kBlockM, kHeadDim)
  Tensor gK = local_tile(mK, TileKV{}, make_coord(_, 0));          // (kBlockN, kHeadDim, n)
  Tensor gV = local_tile(mV, TileKV{}, make_coord(_, 0));          // (kBlockN, kHeadDim, n)
  Tensor gO = local_tile(mO, TileQ{}, make_coord(m_block, 0));     // (kBlockM, kHeadDim)
  Tensor gLSE = local_tile(mLSE, Shape<Int<kBlockM>>{}, make_coord(m_block));  // (kBlockM)

  extern __shared__ char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), typename Traits::SmemLayoutM{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutN{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutN{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutNt{});  // (kHeadDim, kBlockN)

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc_o = partition_fragment_C(tiled_mma, TileQ{});  // (MMA, MMA_M, MMA_K)

  // Only a window, a varlen sequence or a cache with no keys, or a split past the keys, can hide every key
  // from every row here (testing it where none can raised the D = 128 forward's spills from 116 to 360
  // bytes): O = 0, LSE = +inf (or the sink's logit; a partial's -inf, which weighs it 0 in the combine).
  if ((Windowed || General || KvCache) && n_block_end <= n_block_begin) {
    clear(acc_o);
    if constexpr (KvCache) {
      if (partial) {
        Tensor lse = make_tensor<float>(Int<2 * decltype(size<1>(acc_o))::value>{});
        fill(lse, -INFINITY);
        store_split_partial<Traits>(params, tiled_mma, acc_o, lse, split, seq, head, m_block);
        if constexpr (FusedCombine) {
          combine_in_last_split<Element, kBlockM, Traits::kNThreads>(params, seq.batch, head, m_block);
        }
        return;
      }
    }
    store_acc_tile<Traits>(tiled_mma, acc_o, sQ, gO, q_rows_left, params.head_dim);
    Tensor lse = make_tensor<float>(Int<2 * decltype(size<1>(acc_o))::value>{});
    fill(lse, params.sinks == nullptr ? INFINITY : params.sinks[head]);
    store_row_values(lse, gLSE, thr_mma.partition_C(make_identity_tensor(TileQ{})), q_rows_left);
    return;
  }

  // Global -> shared copies and the (row, col) each one covers, for bounds.
  typename Traits::GmemTiledCopyLoad gmem_copy;
  auto gmem_thr_copy = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_M, CPY_K)
  Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = gmem_thr_copy.partition_D(sK);
  Tensor tVgV = gmem_thr_copy.partition_S(gV);
  Tensor tVsV = gmem_thr_copy.partition_D(sV);
  Tensor tQcQ = gmem_thr_copy.partition_S(make_identity_tensor(TileQ{}));
  Tensor tKVcKV = gmem_thr_copy.partition_S(make_identity_tensor(TileKV{}));

  // Shared -> register operands, read with ldmatrix.
  Tensor tSrQ = make_tensor<Element>(partition_shape_A(tiled_mma, TileQ{}));  // (MMA, MMA_M, MMA_K)
  Tensor tSrK = make_tensor<Element>(partition_shape_B(tiled_mma, TileKV{}));
  Tensor tOrVt = make_tensor<Element>(partition_shape_B(tiled_mma, Shape<Int<kHeadDim>, Int<kBlockN>>{}));
  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = smem_copy_q.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsK = smem_copy_k.get_thread_slice(tid).partition_S(sK);
  Tensor tOsVt = smem_copy_v.get_thread_slice(tid).partition_S(sVt);

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));  // (row, col) of each score

  // Key (or value) block n_block into shared memory; with CheckRows, rows past the sequence arrive as 0. A paged
  // cache (KvCache only) takes each row's address from the block table.
  auto load_kv = [&](auto check_rows, auto const &tKVgKV, auto &tKVsKV, HeadTensor const &cache, int n_block)
      __attribute__((always_inline)) {
    constexpr bool kCheckRows = decltype(check_rows)::value;
    int const rows_left = seq.seqlen_k - n_block * kBlockN;
    if constexpr (KvCache) {
      if (params.pages.table != nullptr) {
        auto row_address = [&](int row) {
          return cache_row<Element const>(cache, params.pages, seq.k_batch, seq.k_start + n_block * kBlockN + row,
                                          params.kv_head(head));
        };
        load_tile_rows<kCheckRows>(gmem_copy, tKVgKV(_, _, _, 0), tKVsKV, tKVcKV, rows_left, params.head_dim,
                                   row_address);
        return;
      }
    }
    load_tile<kCheckRows>(gmem_copy, tKVgKV(_, _, _, n_block), tKVsKV, tKVcKV, rows_left, params.head_dim);
  };

  // Prologue: Q and the first K block. Key blocks are visited from the last down, so the ragged block and
  // those the window's right edge crosses come first, and those its left edge crosses last.
  int n_block = n_block_end - 1;
  load_tile<true>(gmem_copy, tQgQ, tQsQ, tQcQ, q_rows_left, params.head_dim);
  load_kv(cute::true_type{}, tKgK, tKsK, params.k, n_block);
  cp_async_fence();

  clear(acc_o);
  OnlineSoftmax<2 * decltype(size<1>(acc_o))::value> softmax;  // two rows per 16-row MMA tile

  auto step = [&](int n_block, auto is_first, auto is_masked) __attribute__((always_inline)) {
    constexpr bool kFirst = decltype(is_first)::value;
    Tensor acc_s = partition_fragment_C(tiled_mma, TileS{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n_block] has landed, and every warp is done with V[n_block + 1]
    // V streams in while Q·Kᵀ runs. Only the first block visited can be the ragged last one.
    load_kv(is_first, tVgV, tVsV, params.v, n_block);
    cp_async_fence();

    gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, smem_copy_q, smem_copy_k);
    mask.template apply<decltype(is_masked)::value>(acc_s, tScS, m_block, n_block);

    cp_async_wait<0>();
    __syncthreads();  // V[n_block] has landed, and every warp is done with K[n_block]
    if (n_block > n_block_begin) {  // the next K streams in while the softmax and P·V run
      load_kv(cute::false_type{}, tKgK, tKsK, params.k, n_block - 1);
      cp_async_fence();
    }

    softmax.template update<kFirst>(acc_s, acc_o, params.softmax_scale_log2);
    Tensor rP = convert_type<Element>(acc_s);
    if constexpr (General) {
      // On the 16-bit P (zeroing is exact there): the Philox calls then run beside half the registers that
      // the fp32 tile would hold (at D = 128, dropping the fp32 tile more than doubled the variant's spills).
      if (dropout_on) {
        Dropout{params, batch, head}.template drop<Traits::kWarpsN == 1>(rP, tScS, m_block * kBlockM, n_block * kBlockN);
      }
    }
    Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a(rP.layout()));  // P as the A operand, in place
    gemm_reg_smem(tiled_mma, acc_o, tOrP, tOrVt, tOsVt, smem_copy_v);
  };

  int const n_block_first_masked = mask.n_block_first_masked(m_block);
  int const n_block_unmasked_begin = mask.n_block_unmasked_begin(m_block);
  if (n_block >= n_block_first_masked || n_block < n_block_unmasked_begin) {
    step(n_block, cute::true_type{}, cute::true_type{});
  } else {  // e.g. non-causal with seqlen_k a multiple of kBlockN: no block needs masking
    step(n_block, cute::true_type{}, cute::false_type{});
  }
  for (--n_block; n_block >= n_block_first_masked && n_block >= n_block_begin; --n_block) {
    step(n_block, cute::false_type{}, cute::true_type{});
  }
  for (; n_block >= n_block_unmasked_begin && n_block >= n_block_begin; --n_block) {
    step(n_block, cute::false_type{}, cute::false_type{});
  }
  if constexpr (Windowed && General) {  // the blocks the window's left edge crosses
    for (; n_block >= n_block_begin; --n_block) { step(n_block, cute::false_type{}, cute::true_type{}); }
  }

  // Epilogue: normalise once, then O through shared memory (Q's buffer) and the LSE from registers.
  Tensor lse = softmax.finalize(acc_o, sink_log2(), dropout_on ? params.dropout_scale : 1.f);
  if constexpr (KvCache) {
    if (partial) {
      CUTE_UNROLL
      for (int r = 0; r < size(lse); ++r) { lse(r) = lse(r) == INFINITY ? -INFINITY : lse(r); }  // saw no key
      store_split_partial<Traits>(params, tiled_mma, acc_o, lse, split, seq, head, m_block);
      if constexpr (FusedCombine) {
        combine_in_last_split<Element, kBlockM, Traits::kNThreads>(params, seq.batch, head, m_block);
      }
      return;
    }
  }
  store_acc_tile<Traits>(tiled_mma, acc_o, sQ, gO, q_rows_left, params.head_dim);
  store_row_values(lse, gLSE, thr_mma.partition_C(make_identity_tensor(TileQ{})), q_rows_left);
}

}  // namespace flash
