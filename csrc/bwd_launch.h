// Host-side launches of the backward kernels for one (head dim, dtype); each is instantiated in its own
// translation unit. The binding runs: preprocess (D), dQ, dK/dV.
#pragma once

#include <cuda_runtime.h>

#include "bwd_dkdv_kernel.h"
#include "bwd_dq_kernel.h"
#include "bwd_preprocess.h"
#include "kernel_traits.h"
#include "launch_utils.h"

namespace flash {

template <int kHeadDim, typename Element>
cudaError_t run_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, Element, bwd_dq_tile>;
  constexpr int kSmemSize = 2 * Traits::kSmemSizeM + 4 * Traits::kSmemSizeN;  // Q, dO; 2 x (K, V)
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.heads);
  return bool_switch(params.is_causal, [&](auto causal) {
    return launch_kernel(&bwd_dq_kernel<Traits, decltype(causal)::value>, grid, Traits::kNThreads, kSmemSize, params,
                         stream);
  });
}

template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  constexpr int kSplits = bwd_dkdv_column_splits(kHeadDim);
  using Traits = TraitsFor<kHeadDim, Element, bwd_dkdv_tile, kHeadDim / kSplits>;
  // K, V; 2 x (Q, dO); 2 x (LSE, D)
  constexpr int kSmemSize = 2 * Traits::kSmemSizeM + 4 * Traits::kSmemSizeN + 4 * Traits::kBlockN * sizeof(float);
  dim3 const grid(ceil_div(params.seqlen_k, Traits::kBlockM) * kSplits, params.batch, params.heads);
  return bool_switch(params.is_causal, [&](auto causal) {
    return launch_kernel(&bwd_dkdv_kernel<Traits, kSplits, decltype(causal)::value>, grid, Traits::kNThreads,
                         kSmemSize, params, stream);
  });
}

}  // namespace flash
