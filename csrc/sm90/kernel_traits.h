// CuTe types of the Hopper forward for one (head dim, dtype), derived from sm90/tile_config.h: the two
// warpgroup MMAs, the shared-memory layouts (GMMA's swizzled canonical ones, which TMA writes too), the TMA
// copies, the pipelines and the shared storage.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "common/flash.h"

#include "named_barriers.h"
#include "tile_config.h"

namespace flash::sm90 {

using namespace cute;

// (seqlen, head_dim, heads, batch) view of a (batch, seqlen, heads, head_dim) tensor: the TMA descriptors'
// shape, so that out-of-range rows and columns read as zeros and are not written.
using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;

// The TMA views' shapes. A varlen (total, heads, head_dim) tensor is one batch of all its rows, a sequence
// being found at its first row (BlockInfo); so a tile's rows past the sequence's end are the next sequence's
// (masked keys, unused query rows) or, past the tensor's end, zeros. Varlen: the kernel may be given
// cu_seqlens (fwd_kernel.h); without it the shapes fold to the params' constants.
template <bool Varlen>
CUTE_HOST_DEVICE bool tma_varlen(AttnParams const &p) { return Varlen && p.cu_seqlens_q != nullptr; }
template <bool Varlen>
CUTE_HOST_DEVICE GmemShape tma_shape_q(AttnParams const &p) {
  return tma_varlen<Varlen>(p) ? GmemShape{p.total_q, p.head_dim, p.heads, 1}
                               : GmemShape{p.seqlen_q, p.head_dim, p.heads, p.batch};
}
template <bool Varlen>
CUTE_HOST_DEVICE GmemShape tma_shape_k(AttnParams const &p) {
  return tma_varlen<Varlen>(p) ? GmemShape{p.total_k, p.head_dim, p.heads_kv, 1}
                               : GmemShape{p.seqlen_k, p.head_dim, p.heads_kv, p.batch};
}

// GMMA's canonical K-major layout with the widest swizzle whose atom the head dim is a multiple of.
template <typename Element, int kCols>
using SmemAtomK = std::conditional_t<kCols % 64 == 0, GMMA::Layout_K_SW128_Atom<Element>,
                                     std::conditional_t<kCols % 32 == 0, GMMA::Layout_K_SW64_Atom<Element>,
                                                        GMMA::Layout_K_SW32_Atom<Element>>>;

// The tile's fields are template parameters, defaulted from fwd_tile(), so that benchmarks/tile_sweep_sm90.cu
// can build candidates and ablations beside the chosen one.
template <int kHeadDim_, typename Element_, int kBlockM_ = fwd_tile(kHeadDim_).block_m,
          int kBlockN_ = fwd_tile(kHeadDim_).block_n, int kStages_ = fwd_tile(kHeadDim_).stages,
          bool kIntraWgOverlap_ = fwd_tile(kHeadDim_).intra_wg_overlap, bool kPingpong_ = fwd_tile(kHeadDim_).pingpong,
          bool kPersistent_ = fwd_tile(kHeadDim_).persistent, int kExp2FmaOf8_ = fwd_tile(kHeadDim_).exp2_fma_of8>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr bool kIntraWgOverlap = kIntraWgOverlap_;
  static constexpr bool kPingpong = kPingpong_;
  static constexpr bool kPersistent = kPersistent_;
  static constexpr bool kVarlenCommonLoop = fwd_tile(kHeadDim_).varlen_common_loop;
  static constexpr int kExp2FmaOf8 = kExp2FmaOf8_;
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpgroups * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kThreads = kConsumerThreads + cutlass::NumThreadsPerWarpGroup;  // + the producer
  // setmaxnreg: the producer gives its registers to the consumers (65536 per SM in all).
  static constexpr int kProducerRegisters = kConsumerWarpgroups == 2 ? 40 : 32;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 232 : 160;

  static_assert(kBlockM % 64 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0);
  // Ping-pong: a warpgroup waits on its own turn barrier, which the warpgroup before it arrives at once it
  // has issued its matmuls: two warpgroups on each.
  static constexpr int kTurnThreads = 2 * cutlass::NumThreadsPerWarpGroup;
  static_assert(!kPingpong || (kConsumerWarpgroups >= 2 && int(FwdBarrier::WarpgroupTurn1) + kConsumerWarpgroups <=
                                                               int(FwdBarrier::WarpgroupTurnEnd)),
                "ping-pong takes turns among two or three warpgroups, one turn barrier each");
  static_assert(kExp2FmaOf8 >= 0 && kExp2FmaOf8 <= 8 && (kExp2FmaOf8 == 0 || kIntraWgOverlap),
                "exp2 on the FMA units: in the overlapped key loop only");
  static_assert(kProducerRegisters * cutlass::NumThreadsPerWarpGroup + kConsumerRegisters * kConsumerThreads <= 65536);
  static_assert(sizeof(Element) == 2);

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;

  // Each consumer warpgroup owns 64 rows. S = Q·Kᵀ with both operands in shared memory; O += P·V with P
  // from registers (the softmax leaves it there) and V read MN-major (its rows are the reduction).
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpgroupLayout{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{}, TileQ{}));  // O reuses it
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtomK<Element, kHeadDim>{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V seen as (kHeadDim, kBlockN, stages): the B operand of P·V, its head dim contiguous (MN-major).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const *>(nullptr)), GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}, TileQ{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutKV{}), TileKV{}, _1{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensor{}, SmemLayoutQ{}, TileQ{}, _1{}));
  // The varlen O store of a tile that ends past its sequence's last row, which it must not write (the next
  // sequence's): 16-byte loads from the swizzled buffer (swizzles move whole 16-byte chunks) and stores predicated per row.
  // Threads per row: the largest power of two that divides the row's 16-byte chunks (96: 4 threads, 3 each).
  static constexpr int kGmemThreadsPerRow = (kHeadDim / 8) % 32 == 0   ? 32
                                            : (kHeadDim / 8) % 16 == 0 ? 16
                                            : (kHeadDim / 8) % 8 == 0  ? 8
                                                                       : 4;
  static_assert((kHeadDim / 8) % kGmemThreadsPerRow == 0 && kConsumerThreads % kGmemThreadsPerRow == 0);
  using GmemTiledCopyO = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
      Layout<Shape<Int<kConsumerThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>, Stride<Int<kGmemThreadsPerRow>, _1>>{},
      Layout<Shape<_1, _8>>{}));
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  // O gets a buffer of its own where shared memory allows, so that the next tile's Q can land while this
  // tile's O is stored; else it reuses Q's.
  static constexpr int kTileBytes = (cosize_v<SmemLayoutQ> + 2 * cosize_v<SmemLayoutKV>) * sizeof(Element);
  static constexpr bool kSeparateO = kTileBytes + cosize_v<SmemLayoutQ> * int(sizeof(Element)) <= 224 * 1024;

  struct SharedStorage {
    // 128-byte swizzles repeat every 1024 bytes: each tile starts on such a boundary.
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(1024) cute::array_aligned<Element, kSeparateO ? cosize_v<SmemLayoutQ> : 0> o;
    alignas(16) uint64_t q_full;  // mbarrier: this tile's Q has landed
    typename Pipeline::SharedStorage pipeline_k, pipeline_v;
    CUTE_DEVICE Element *o_buffer() { return kSeparateO ? o.data() : q.data(); }
  };
  static constexpr int kSmemSize = sizeof(SharedStorage);
  static_assert(kSmemSize <= 227 * 1024, "the tiles outgrow the 227 KB of shared memory a block may have");

  // What the kernel receives: the params and the TMA descriptors built from them on the host.
  struct KernelParams {
    FwdParams params;
    TmaQ tma_q;
    TmaKV tma_k, tma_v;
    TmaO tma_o;
  };
};

// The traits of one of tile_config.h's choices: fwd_tile(head_dim, full_rows).
template <int kHeadDim, typename Element, bool kFullRows>
using FwdTraitsOf =
    FwdTraits<kHeadDim, Element, fwd_tile(kHeadDim, kFullRows).block_m, fwd_tile(kHeadDim, kFullRows).block_n,
              fwd_tile(kHeadDim, kFullRows).stages, fwd_tile(kHeadDim, kFullRows).intra_wg_overlap,
              fwd_tile(kHeadDim, kFullRows).pingpong, fwd_tile(kHeadDim, kFullRows).persistent,
              fwd_tile(kHeadDim, kFullRows).exp2_fma_of8>;

}  // namespace flash::sm90
