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
// num_splits > 1, the combine of the splits' partials (params.o_partial, lse_partial) into o and lse: a
// second kernel, or, with params.split_counters (FLASH_ATTN2_DECODE_FUSED_COMBINE=1), the split kernel's
// FusedCombine variant, whose last block per tile combines (built only with FLASH_ATTN2_BUILD_DECODE_FUSED=1,
// setup.py's FLASH_ATTN2_DECODE_FUSED). That variant is built for the common kernels
// only (two more per head dim and dtype, not four: the units' compile time is the build's budget); the
// general ones (softcap, ALiBi, a window's left edge) keep the combine kernel.
template <int kHeadDim, typename Element>
cudaError_t run_fwd_kvcache(FwdParams const &params, cudaStream_t stream) {
  using Traits = TraitsFor<kHeadDim, Element, fwd_kvcache_tile>;
  dim3 const grid(ceil_div(params.seqlen_q, Traits::kBlockM) * params.num_splits, params.batch, params.heads);
  bool const fused = FLASH_ATTN2_DECODE_FUSED && params.num_splits > 1 && params.split_counters != nullptr &&
                     !params.needs_general();
  cudaError_t err = variant_switch(params, [&](auto windowed, auto general) {
    auto const run = [&](auto fused_combine) {
      return launch_kernel(&fwd_kernel<Traits, decltype(windowed)::value, decltype(general)::value, true,
                                       decltype(fused_combine)::value>,
                           grid, Traits::kNThreads, fwd_smem_size<Traits>(), params, stream);
    };
    if constexpr (FLASH_ATTN2_DECODE_FUSED && !decltype(general)::value) {
      if (fused) { return run(std::true_type{}); }
    }
    return run(std::false_type{});
  });
  if (err == cudaSuccess && params.num_splits > 1 && !fused) { err = run_split_combine<Element>(params, stream); }
  return err;
}

}  // namespace flash
