// CuTe types derived from a tile shape: the MMA, shared-memory layouts and the copies between levels.
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

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct KernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim must be a multiple of 32, at most 256");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0, "key blocks are whole k16 slices of P·V");

  // Warps are stacked along M; the N tile of 16 lets one ldmatrix.x4 feed two n8 MMAs.
  using TiledMma = TiledMMA<Sm80MmaAtom<Element>, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared memory: rows of 64 (or 32) elements, XOR-swizzled so ldmatrix reads of 8 rows hit distinct banks.
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzle = kBlockKSmem == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzle, 3, 3>{}, Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Vᵀ as the B operand of P·V: the same bytes as V, read with transposing ldmatrix.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutO = SmemLayoutQ;

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // Accumulator fragments go to shared memory two elements (32 bits) at a time.
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  // Global <-> shared: 16 bytes per thread per copy, rows of a tile spread over consecutive threads.
  static constexpr int kGmemElemsPerLoad = sizeof(cute::uint128_t) / sizeof(Element);
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / kGmemElemsPerLoad;
  static_assert(kNThreads % kGmemThreadsPerRow == 0);
  using GmemThreadLayout = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                  Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemValLayout = Layout<Shape<_1, Int<kGmemElemsPerLoad>>>;
  // cp.async with zero-fill: rows past seqlen and columns past head_dim arrive as zeros.
  using GmemTiledCopyLoad = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));
  using GmemTiledCopyStore = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));

  static constexpr int kSmemSizeQ = int(cosize_v<SmemLayoutQ>) * sizeof(Element);
  static constexpr int kSmemSizeKV = int(cosize_v<SmemLayoutKV>) * sizeof(Element);
};

// The forward's tiles for one head dim (tile_config.h chooses them).
template <int kHeadDim, typename Element>
using FwdTraits = KernelTraits<kHeadDim, fwd_tile(kHeadDim).block_m, fwd_tile(kHeadDim).block_n,
                               fwd_tile(kHeadDim).warps, Element>;

}  // namespace flash
