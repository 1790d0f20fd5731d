// CuTe types of the Hopper backward kernels for one (head dim, dtype), the dK/dV kernel's from
// sm90/tile_config.h's bwd_dkdv_tile(), the dQ kernel's from bwd_dq_tile(): their warpgroup matmuls, the
// shared-memory layouts (GMMA's swizzled canonical ones, which TMA reads and writes too), the TMA copies,
// the pipeline and the shared storage. The GMEM views and swizzle atoms are the forward's (kernel_traits.h).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "common/flash.h"

#include "kernel_traits.h"
#include "tile_config.h"

namespace flash::sm90 {

using namespace cute;

// dK and dV are written per query head (flash.h's BwdParams): k's rows and head dim, q's heads; a varlen
// call's are one batch of all total_k rows, as tma_shape_k's (kernel_traits.h).
template <bool Varlen = false>
CUTE_HOST_DEVICE GmemShape tma_shape_dk(AttnParams const &p) {
  return tma_varlen<Varlen>(p) ? GmemShape{p.total_k, p.head_dim, p.heads, 1}
                               : GmemShape{p.seqlen_k, p.head_dim, p.heads, p.batch};
}

// One head's rows of a TMA view (mQ-like: (seqlen, head_dim, heads, batch)), the sequence's first row at row
// 0: a varlen view is one batch (kernel_traits.h), in which the sequence starts at row start (BlockInfo).
// Without Varlen, the view of before varlen existed, so that those kernels' code is unchanged.
template <bool Varlen, class TmaTensor>
CUTE_DEVICE auto sequence_rows(TmaTensor const &m, AttnParams const &p, int head, int batch, int start) {
  if constexpr (Varlen) {
    return domain_offset(make_coord(start, _0{}), m(_, _, head, tma_varlen<Varlen>(p) ? 0 : batch));
  } else {
    return m(_, _, head, batch);
  }
}

// The varlen store of a gradient tile (dQ, dK, dV) that crosses its sequence's end: the TMA store would
// write the next sequence's rows, which another block owns. 16-byte loads from the swizzled buffer (the
// swizzles move whole 16-byte chunks) and stores predicated per row, as the forward's O (fwd_epilogue.h);
// threads per row: the largest power of two up to 32 that divides the row's 16-byte chunks.
template <typename Element, int kHeadDim, int kThreads>
struct BwdRowStore {
  static constexpr int kThreadsPerRow = (kHeadDim / 8) % 32 == 0   ? 32
                                        : (kHeadDim / 8) % 16 == 0 ? 16
                                        : (kHeadDim / 8) % 8 == 0  ? 8
                                                                   : 4;
  static_assert((kHeadDim / 8) % kThreadsPerRow == 0 && kThreads % kThreadsPerRow == 0);
  using TiledCopy = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
      Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>{},
      Layout<Shape<_1, _8>>{}));

  // sTile: the tile in shared memory; gTile: its (rows, kHeadDim) place in this sequence's rows (BlockInfo's
  // q_rows, k_rows); only rows below rows_left and columns below head_dim (a multiple of 8) are written.
  // Every consumer thread takes part.
  template <class SmemTile, class GmemTile>
  CUTE_DEVICE static void store(SmemTile const &sTile, GmemTile &gTile, int rows_left, int head_dim, int thread_idx) {
    TiledCopy gmem_copy;
    auto thr_copy = gmem_copy.get_thread_slice(thread_idx);
    Tensor tGsG = thr_copy.partition_S(sTile);  // (CPY, CPY_M, CPY_K)
    Tensor tGgG = thr_copy.partition_D(gTile);
    Tensor tGcG = thr_copy.partition_D(make_identity_tensor(shape(gTile)));  // (row, col) of each chunk
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tGsG); ++m) {
      if (get<0>(tGcG(0, m, 0)) < rows_left) {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tGsG); ++k) {
          if (get<1>(tGcG(0, m, k)) < head_dim) { copy(gmem_copy, tGsG(_, m, k), tGgG(_, m, k)); }
        }
      }
    }
  }
};

// A head-major tensor as the TMA copies of both kernels see it (kernel_traits.h's GmemShape, GmemStride).
template <typename Element>
using BwdGmemTensor =
    decltype(make_tensor(make_gmem_ptr(static_cast<Element const *>(nullptr)), GmemShape{}, GmemStride{}));

template <int kHeadDim_, typename Element_, int kBlockM_ = bwd_dkdv_tile(kHeadDim_).block_m,
          int kBlockN_ = bwd_dkdv_tile(kHeadDim_).block_n, int kStages_ = bwd_dkdv_tile(kHeadDim_).stages,
          int kOverlap_ = bwd_dkdv_tile(kHeadDim_).overlap, bool kPrefetchRows_ = bwd_dkdv_tile(kHeadDim_).prefetch_rows,
          bool kDescPerStep_ = bwd_dkdv_tile(kHeadDim_).desc_per_step>
struct BwdDkdvTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // queries per step
  static constexpr int kBlockN = kBlockN_;  // keys per thread block
  static constexpr int kStages = kStages_;
  static constexpr int kOverlap = kOverlap_;  // where dK of step n is issued (tile_config.h's BwdTile)
  // Overlapped, a step holds its own stage and the previous one's: one stage would deadlock.
  static_assert(kOverlap >= 0 && kOverlap <= 2 && (kOverlap == 0 || kStages >= 2));
  static constexpr bool kPrefetchRows = kPrefetchRows_;  // LSE and D read a step ahead (tile_config.h's BwdTile)
  static constexpr bool kDescPerStep = kDescPerStep_;  // K's, V's descriptors rebuilt per step (BwdTile)
  static constexpr int kConsumerWarpgroups = kBlockN / 64;
  static constexpr int kConsumerThreads = kConsumerWarpgroups * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kThreads = kConsumerThreads + cutlass::NumThreadsPerWarpGroup;  // + the producer
  // setmaxnreg: the producer, one thread issuing TMA, gives its registers to the consumers (65536 per SM).
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 240 : 160;

  static_assert(kBlockN % 64 == 0 && kBlockM % 16 == 0 && kHeadDim % 16 == 0);
  static_assert(kProducerRegisters * cutlass::NumThreadsPerWarpGroup + kConsumerRegisters * kConsumerThreads <= 65536);
  static_assert(sizeof(Element) == 2);

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;   // Q, dO
  using TileK = Shape<Int<kBlockN>, Int<kHeadDim>>;   // K, V, dK, dV
  using TileSt = Shape<Int<kBlockN>, Int<kBlockM>>;  // Sᵀ, dPᵀ: (keys, queries)

  // The transposed products put this block's keys in the M mode, 64 per warpgroup: Sᵀ = K·Qᵀ and
  // dPᵀ = V·dOᵀ read K, V (A) and Q, dO (B) from shared memory, all K-major (their head dim contiguous, as
  // TMA lands them). Their accumulators are then, with no data moved, the register A operands Pᵀ and dSᵀ of
  // dV += Pᵀ·dO and dK += dSᵀ·Q, whose B (dO, Q) is read MN-major (its rows are the reduction): neither Pᵀ
  // nor dSᵀ goes through shared memory.
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  using TiledMmaSt = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), WarpgroupLayout{}));
  using TiledMmaDkv = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  using SmemLayoutK = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{}, TileK{}));  // K, V; then dK, dV
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));  // Q, dO
  // Q and dO seen as (kHeadDim, kBlockM, stages): the B operands of dK and dV, head dim contiguous.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using GmemTensor = BwdGmemTensor<Element>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}), TileQ{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{}, TileK{}, _1{}));
  using TmaDk = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensor{}, SmemLayoutK{}, TileK{}, _1{}));
  using RowStore = BwdRowStore<Element, kHeadDim, kConsumerThreads>;  // varlen dK, dV tiles past the sequence's end
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = kBlockN * kHeadDim * sizeof(Element);

  // One pipeline stage holds a query block's Q and dO, which every step reads together.
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    // 128-byte swizzles repeat every 1024 bytes: each tile starts on such a boundary.
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(16) uint64_t kv_full;  // mbarrier: K and V have landed
    typename Pipeline::SharedStorage pipeline_q;
  };
  static constexpr int kSmemSize = sizeof(SharedStorage);
  static_assert(kSmemSize <= 227 * 1024, "the tiles outgrow the 227 KB of shared memory a block may have");

  struct KernelParams {
    BwdParams params;
    TmaQ tma_q, tma_do;
    TmaK tma_k, tma_v;
    TmaDk tma_dk, tma_dv;
  };
};

// The dK/dV kernel with the atomic dQ (bwd_dkdv_kernel.h's AtomicDq; the non-deterministic backward): Base's
// types and tiles, plus a dS buffer in shared memory and the matmul dQ_partial = dS·K of each step, whose
// rows are the step's kBlockM queries. Apart from Base, so that the split backward's kernel and its shared
// memory stay as they are.
//
// How the two consumer warpgroups share dQ_partial (kBlockM, kHeadDim), by registers (kHeadDim / 4 or / 2
// fp32 per thread) and by what GMMA can read: split N, each warpgroup takes half of the head dim over all
// kBlockN keys (every warpgroup's dS first in shared memory: one barrier of both, two dS buffers), where that
// half is whole 128-byte swizzle columns of K's buffer (D = 128: 32 accumulators); else split K, each
// warpgroup over its own 64 keys and the whole head dim (D = 64: 32 accumulators too, a barrier of its own
// threads only, twice the atomic adds). A half of one swizzle column (D = 64's 32) is no canonical GMMA
// layout of the MN-major B operand.
template <class Base>
struct BwdDkdvAtomicDqTraits : Base {
  using Element = typename Base::Element;
  static constexpr int kHeadDim = Base::kHeadDim, kBlockM = Base::kBlockM, kBlockN = Base::kBlockN;
  using AtomK = SmemAtomK<Element, kHeadDim>;  // K's buffer's swizzle atom (rows, columns)
  static constexpr int kAtomCols = decltype(size<1>(AtomK{}))::value;
  static constexpr bool kDqSplitN = Base::kConsumerWarpgroups == 2 && (kHeadDim / 2) % kAtomCols == 0;
  static_assert(kDqSplitN || Base::kConsumerWarpgroups == 1 || kAtomCols == kHeadDim,
                "split K: each warpgroup's 64 rows of K must be one contiguous piece of its buffer");
  static constexpr int kDqN = kDqSplitN ? kHeadDim / 2 : kHeadDim;  // dQ columns per warpgroup
  static constexpr int kDqK = kDqSplitN ? kBlockN : 64;             // keys per warpgroup's product
  // dSᵀ as the Sᵀ accumulators hold it, (keys, queries), the queries contiguous (stmatrix rows); read back
  // as dS (queries, keys), MN-major, the A operand of dQ_partial. One buffer per step in flight: split N, a
  // warpgroup writes step n + 1's while the other may still read step n's.
  using AtomdS = SmemAtomK<Element, kBlockM>;
  static_assert(decltype(size<1>(AtomdS{}))::value == kBlockM,
                "split K: each warpgroup's 64 rows of dSᵀ must be one contiguous piece of its buffer");
  static constexpr int kDsBuffers = kDqSplitN ? 2 : 1;
  using SmemLayoutdSt = decltype(tile_to_shape(AtomdS{}, Shape<Int<kBlockN>, Int<kBlockM>>{}));
  // One warpgroup's operands, each a contiguous piece of its buffer (the static_asserts above), starting
  // at warpgroup w's offset: w·cosize (split N: K's w-th column half; split K: the w-th 64 rows of both).
  using SmemLayoutdSdq = decltype(composition(tile_to_shape(AtomdS{}, Shape<Int<kDqK>, Int<kBlockM>>{}),
                                              make_ordered_layout(Shape<Int<kBlockM>, Int<kDqK>>{}, Step<_2, _1>{})));
  using SmemLayoutKtdq = decltype(composition(tile_to_shape(AtomK{}, Shape<Int<kDqK>, Int<kDqN>>{}),
                                              make_ordered_layout(Shape<Int<kDqN>, Int<kDqK>>{}, Step<_2, _1>{})));
  static constexpr int kOffsetdS = kDqSplitN ? 0 : kDqK * kBlockM;  // per warpgroup, in elements
  static constexpr int kOffsetK = kDqK * kDqN;
  using TileDq = Shape<_64, Int<kDqN>>;  // one warpgroup's dQ_partial: (queries, head dim columns)
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqN>, Int<kDqK>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));  // one warpgroup
  static_assert(kBlockM == 64, "dQ_partial's rows are one warpgroup's 64");

  struct SharedStorage : Base::SharedStorage {
    alignas(1024) cute::array_aligned<Element, kDsBuffers * cosize_v<SmemLayoutdSt>> ds;
  };
  static constexpr int kSmemSize = sizeof(SharedStorage);
  static_assert(kSmemSize <= 227 * 1024, "the tiles and dS outgrow the 227 KB of shared memory a block may have");
};

// The dQ kernel's (bwd_dq_kernel.h): its rows are this block's queries, 64 per consumer warpgroup, so
// that S, dP and dQ all have the queries in their M mode and LSE, D are per accumulator row.
template <int kHeadDim_, typename Element_, int kBlockM_ = bwd_dq_tile(kHeadDim_).block_m,
          int kBlockN_ = bwd_dq_tile(kHeadDim_).block_n, int kStages_ = bwd_dq_tile(kHeadDim_).stages,
          int kOverlap_ = bwd_dq_tile(kHeadDim_).overlap>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // queries per thread block
  static constexpr int kBlockN = kBlockN_;  // keys per step
  static constexpr int kStages = kStages_;
  static constexpr int kOverlap = kOverlap_;  // where dQ of step n is issued (tile_config.h's BwdTile)
  static_assert(kOverlap >= 0 && kOverlap <= 2 && (kOverlap == 0 || kStages >= 2));  // as BwdDkdvTraits
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpgroups * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kThreads = kConsumerThreads + cutlass::NumThreadsPerWarpGroup;  // + the producer
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 240 : 160;

  static_assert(kBlockM % 64 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0);
  static_assert(kProducerRegisters * cutlass::NumThreadsPerWarpGroup + kConsumerRegisters * kConsumerThreads <= 65536);
  static_assert(sizeof(Element) == 2);

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;  // Q, dO, dQ
  using TileK = Shape<Int<kBlockN>, Int<kHeadDim>>;  // K, V
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;   // S, dP: (queries, keys)

  // S = Q·Kᵀ and dP = dO·Vᵀ read Q, dO (A) and K, V (B) from shared memory, all K-major. Their accumulators
  // are, with no data moved, the register A operand dS of dQ += dS·K, whose B (K) is read MN-major: its rows
  // are the reduction.
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpgroupLayout{}));
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{}, TileQ{}));  // Q, dO; then dQ
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));  // K, V
  // K seen as (kHeadDim, kBlockN, stages): the B operand of dQ, head dim contiguous.
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, BwdGmemTensor<Element>{}, SmemLayoutQ{}, TileQ{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, BwdGmemTensor<Element>{}, take<0, 2>(SmemLayoutK{}), TileK{},
                                      _1{}));
  using TmaDq = decltype(make_tma_copy(SM90_TMA_STORE{}, BwdGmemTensor<Element>{}, SmemLayoutQ{}, TileQ{}, _1{}));
  using RowStore = BwdRowStore<Element, kHeadDim, kConsumerThreads>;  // varlen dQ tiles past the sequence's end
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = kBlockN * kHeadDim * sizeof(Element);

  // One pipeline stage holds a key block's K and V, which every step reads together.
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(16) uint64_t q_full;  // mbarrier: Q and dO have landed
    typename Pipeline::SharedStorage pipeline_kv;
  };
  static constexpr int kSmemSize = sizeof(SharedStorage);
  static_assert(kSmemSize <= 227 * 1024, "the tiles outgrow the 227 KB of shared memory a block may have");

  struct KernelParams {
    BwdParams params;
    TmaQ tma_q, tma_do;
    TmaK tma_k, tma_v;
    TmaDq tma_dq;
  };
};

}  // namespace flash::sm90
