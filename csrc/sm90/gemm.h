// Warpgroup matmuls (wgmma) of the Hopper kernels: issued asynchronously, waited on by the caller, so that
// a warpgroup can run its softmax while its tensor cores work.
#pragma once

#include <cute/tensor.hpp>

namespace flash::sm90 {

using namespace cute;

// Issues acc (+)= A·B over the whole K extent as one wgmma batch and commits it; the caller waits with
// warpgroup_wait<n>() (n = batches it leaves in flight) and then fences acc before reading it. A: shared
// memory (descriptors) or registers; B: shared memory.
template <bool ZeroInit, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void gemm_issue(TiledMma &mma, TA const &tCrA, TB const &tCrB, TC &acc) {
  constexpr bool kARegisters = !is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  static_assert(decltype(size<2>(tCrA) == size<2>(tCrB))::value);
  // Keep the compiler from moving register reads and writes of the operands across the asynchronous MMA.
  if constexpr (kARegisters) { warpgroup_fence_operand(const_cast<TA &>(tCrA)); }
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (ZeroInit) { mma.accumulate_ = GMMA::ScaleOut::Zero; }
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
  if constexpr (kARegisters) { warpgroup_fence_operand(const_cast<TA &>(tCrA)); }
}

// A wgmma accumulator ((2,2,N/8),MMA_M,MMA_N) as the register A operand of the next 16-bit wgmma,
// ((2,2,2),MMA_M,N/16): the m64k16 A fragment holds what the C fragment holds for two neighbouring
// 8-column groups, so no data moves (the SM90 counterpart of sm80/gemm.h's acc_as_operand_a).
template <class AccLayout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(AccLayout const &acc) {
  static_assert(rank(AccLayout{}) == 3 && rank<0>(AccLayout{}) == 3 && size<0, 2>(AccLayout{}) % 2 == 0);
  auto groups = logical_divide(get<0, 2>(acc), Layout<_2>{});  // (2, N/16)
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0>(groups)), get<1>(acc),
                     coalesce(make_layout(get<1>(groups), get<2>(acc))));
}

}  // namespace flash::sm90
