// CuTe types derived from a tile shape: the MMA, shared-memory layouts and the copies between levels.
//
// Every kernel here owns kBlockM rows (split among its warps, 16 rows per MMA tile) and streams
// kBlockN rows per main-loop step: forward and dQ own query rows and stream keys; dK/dV owns key
// rows and streams queries. "M tile" and "N tile" below are (kBlockM, kHeadDim) and (kBlockN, kHeadDim).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "tile_config.h"

namespace flash {

using namespace cute;

template <typename Element>
using Sm80MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                       MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

// Shared-memory tiles: rows of 64 (or 32) elements, XOR-swizzled so that ldmatrix reading 8 rows
// hits 8 distinct bank groups.
template <int kCols>
constexpr int kAtomCols = kCols % 64 == 0 ? 64 : 32;
template <int kCols>
using SmemAtom = decltype(composition(Swizzle<kAtomCols<kCols> == 64 ? 3 : 2, 3, 3>{},
                                      Layout<Shape<_8, Int<kAtomCols<kCols>>>, Stride<Int<kAtomCols<kCols>>, _1>>{}));
template <int kRows, int kCols>
using SmemTile = decltype(tile_to_shape(SmemAtom<kCols>{}, Shape<Int<kRows>, Int<kCols>>{}));
// The transpose of a (kRows, kCols) tile, for operands read with transposing ldmatrix.
template <int kRows, int kCols>
using SmemTileT = decltype(composition(SmemTile<kRows, kCols>{},
                                       make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));

// Global <-> shared copies of (rows, kCols) tiles: 16 bytes per thread per copy, each row spread over
// consecutive threads so a warp touches whole 128-byte lines.
template <class CopyOp, typename Element, int kNThreads, int kCols, int kRowThreads = kAtomCols<kCols> / 8>
using GmemTiledCopy = decltype(make_tiled_copy(
    Copy_Atom<CopyOp, Element>{},
    Layout<Shape<Int<kNThreads / kRowThreads>, Int<kRowThreads>>, Stride<Int<kRowThreads>, _1>>{},
    Layout<Shape<_1, Int<sizeof(cute::uint128_t) / sizeof(Element)>>>{}));

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_, int kWarpsN_ = 1>
struct KernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kWarpsM = kNWarps / kWarpsN;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim must be a multiple of 32, at most 256");
  static_assert(kNWarps % kWarpsN == 0);
  static_assert(kBlockM % (16 * kWarpsM) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "streamed blocks are whole k16 slices of the second matmul");
  static_assert(sizeof(Element) == 2);

  // kWarpsM x kWarpsN warps; 16 columns per warp in each N tile let one ldmatrix.x4 feed two n8 MMAs.
  // With kWarpsN > 1 every matmul's N (columns) must be a multiple of 16 * kWarpsN.
  using TiledMma = TiledMMA<Sm80MmaAtom<Element>, Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>,
                            Tile<Int<16 * kWarpsM>, Int<16 * kWarpsN>, _16>>;

  using SmemLayoutM = SmemTile<kBlockM, kHeadDim>;
  using SmemLayoutN = SmemTile<kBlockN, kHeadDim>;
  using SmemLayoutNt = SmemTileT<kBlockN, kHeadDim>;  // (kHeadDim, kBlockN): the B operand of the 2nd matmul

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // Accumulator fragments go to shared memory two elements (32 bits) at a time.
  using SmemCopyAtomAcc = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  // cp.async with zero-fill: rows past seqlen and columns past head_dim arrive as zeros.
  using GmemTiledCopyLoad =
      GmemTiledCopy<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element, kNThreads, kHeadDim>;
  template <int kCols>
  using GmemTiledCopyStore = GmemTiledCopy<UniversalCopy<cute::uint128_t>, Element, kNThreads, kCols>;

  static constexpr int kSmemSizeM = int(size(SmemLayoutM{})) * sizeof(Element);
  static constexpr int kSmemSizeN = int(size(SmemLayoutN{})) * sizeof(Element);
};

// Each kernel's tiles for one head dim (tile_config.h chooses them).
template <int kHeadDim, typename Element, TileShape (*kChoose)(int) = fwd_tile>
using TraitsFor = KernelTraits<kHeadDim, kChoose(kHeadDim).block_m, kChoose(kHeadDim).block_n, kChoose(kHeadDim).warps,
                               Element, kChoose(kHeadDim).warps_n>;

}  // namespace flash
