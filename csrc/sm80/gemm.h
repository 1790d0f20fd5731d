// SM80 matmul steps on mma.sync tiles: operands from shared memory through ldmatrix, or an accumulator
// reused in registers as the next matmul's A operand.
#pragma once

#include <cute/tensor.hpp>

namespace flash {

using namespace cute;

// The same accumulator as the A operand of the next MMA: ((2,2),MMA_M,MMA_N) -> ((2,2,2),MMA_M,MMA_N/2).
// The m16n8k16 A fragment is exactly the C fragments of two neighbouring n8 tiles, so no data moves.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(Layout const &acc) {
  static_assert(rank(Layout{}) == 3 && size<2>(Layout{}) % 2 == 0);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2),MMA_M,(2,MMA_N/2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// acc += A·B with both operands in shared memory. ldmatrix of k-slice k+1 is issued before the MMAs of
// slice k so shared-memory latency hides behind tensor-core work.
template <class TiledMma, class Acc, class RegA, class RegB, class SmemA, class SmemB, class CopyA, class CopyB>
CUTE_DEVICE void gemm_smem_smem(TiledMma const &mma, Acc &acc, RegA &tCrA, RegB &tCrB, SmemA const &tCsA,
                                SmemB const &tCsB, CopyA const &copy_a, CopyB const &copy_b) {
  Tensor tCrA_view = make_tensor(tCrA.data(), CopyA::retile(tCrA.layout()));
  Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
  static_assert(size<2>(RegA{}) == size<2>(RegB{}));
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A·B with A already in registers (P, dS) and B in shared memory.
template <class TiledMma, class Acc, class RegA, class RegB, class SmemB, class CopyB>
CUTE_DEVICE void gemm_reg_smem(TiledMma const &mma, Acc &acc, RegA const &tCrA, RegB &tCrB, SmemB const &tCsB,
                               CopyB const &copy_b) {
  Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) { copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1)); }
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

}  // namespace flash
