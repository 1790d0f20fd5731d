// Host-side launch of the forward kernel for one (head dim, dtype); instantiated once per translation unit.
#pragma once

#include <cuda_runtime.h>

#include "fwd_kernel.h"
#include "kernel_traits.h"
#include "static_switch.h"

namespace flash {

template <int kHeadDim, typename Element>
cudaError_t run_fwd(FwdParams const &params, cudaStream_t stream) {
  using Traits = FwdTraits<kHeadDim, Element>;
  constexpr int kSmemSize = Traits::kSmemSizeQ + 2 * Traits::kSmemSizeKV;  // Q, K, V: one buffer each
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.heads);
  return bool_switch(params.is_causal, [&](auto causal) {
    auto kernel = &fwd_kernel<Traits, decltype(causal)::value>;
    if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemSize);
        err != cudaSuccess) {
      return err;
    }
    kernel<<<grid, Traits::kNThreads, kSmemSize, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace flash
