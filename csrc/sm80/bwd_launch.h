// Host-side launches of the backward kernels for one (head dim, dtype); each is instantiated in its own
// translation unit. The binding runs preprocess (D), dQ, dK/dV (deterministic), or preprocess, dK/dV with
// the atomic dQ, then casts the fp32 dQ (non-deterministic).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "common/bwd_preprocess.h"
#include "common/launch_utils.h"

#include "bwd_dkdv_kernel.h"
#include "bwd_dq_kernel.h"
#include "kernel_traits.h"

namespace flash {

template <int kHeadDim, typename Element>
cudaError_t run_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, Element, bwd_dq_tile>;
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.heads);
  return variant_switch(params, [&](auto windowed, auto general) {
    return launch_kernel(&bwd_dq_kernel<Traits, decltype(windowed)::value, decltype(general)::value>, grid,
                         Traits::kNThreads, bwd_dq_smem_size<Traits>(), params, stream);
  });
}

template <int kHeadDim, typename Element, bool AtomicDq>
cudaError_t launch_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  using Traits = std::conditional_t<AtomicDq, TraitsFor<kHeadDim, Element, bwd_dkdv_atomic_tile>,
                                    TraitsFor<kHeadDim, Element, bwd_dkdv_tile>>;
  dim3 const grid(ceil_div(params.seqlen_k, Traits::kBlockM), params.batch, params.heads);
  return variant_switch(params, [&](auto windowed, auto general) {
    return launch_kernel(&bwd_dkdv_kernel<Traits, decltype(windowed)::value, decltype(general)::value, AtomicDq>,
                         grid, Traits::kNThreads, bwd_dkdv_smem_size<Traits, AtomicDq>(), params, stream);
  });
}

template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<kHeadDim, Element, false>(params, stream);
}

// dK, dV and (atomically, into params.dq_accum) dQ: in translation units of their own, so that neither the
// split backward's kernels nor their build change.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv_atomic_dq(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<kHeadDim, Element, true>(params, stream);
}

}  // namespace flash
