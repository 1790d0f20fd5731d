// Host-side launch of the forward kernel for one (head dim, dtype); instantiated once per translation unit.
#pragma once

#include <cuda_runtime.h>

#include "common/launch_utils.h"
#include "common/split_combine.h"

#include "fwd_kernel.h"
#include "kernel_traits.h"

namespace flash {

template <int kHeadDim, typename Element>
cudaError_t run_fwd(FwdParams const &params, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, Element, fwd_tile>;
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.heads);
  return variant_switch(params, [&](auto windowed, auto general) {
    return launch_kernel(&fwd_kernel<Traits, decltype(windowed)::value, decltype(general)::value>, grid,
                         Traits::kNThreads, fwd_smem_size<Traits>(), params, stream);
  });
}

// Over a KV cache (flash_attn_with_kvcache): the kernel's KvCache variant on the decoding tiles, then, with
// num_splits > 1, the combine of the splits' partials (params.o_partial, lse_partial) into o and lse.
template <int kHeadDim, typename Element>
cudaError_t run_fwd_kvcache(FwdParams const &params, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, Element, fwd_kvcache_tile>;
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM) * params.num_splits, params.batch, params.heads);
  cudaError_t err = variant_switch(params, [&](auto windowed, auto general) {
    return launch_kernel(&fwd_kernel<Traits, decltype(windowed)::value, decltype(general)::value, true>, grid,
                         Traits::kNThreads, fwd_smem_size<Traits>(), params, stream);
  });
  if (err == cudaSuccess && params.num_splits > 1) { err = run_split_combine<Element>(params, stream); }
  return err;
}

}  // namespace flash
