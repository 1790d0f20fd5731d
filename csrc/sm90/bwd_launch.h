// Host-side launch of the Hopper dK/dV kernel for one (head dim, dtype): TMA descriptors from the params,
// then one thread block per (key block, batch, query head). Built only with FLASH_ATTN2_BUILD_SM90_BWD=1.
#pragma once

#include <cuda_runtime.h>

#include "common/flash.h"
#include "common/launch_utils.h"

#include "bwd_dkdv_kernel.h"
#include "bwd_kernel_traits.h"
#include "fwd_launch.h"  // gmem_tensor(): a head-major tensor as TMA sees it

namespace flash::sm90 {

// The common variant only (the binding checks !needs_general()): plain, causal, GQA.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  using Traits = BwdDkdvTraits<kHeadDim, Element>;
  auto const &p = params;
  GmemShape const shape_q = tma_shape_q<false>(p), shape_k = tma_shape_k<false>(p), shape_dk = tma_shape_dk(p);
  typename Traits::SmemLayoutK const layout_k{};
  auto const layout_q = take<0, 2>(typename Traits::SmemLayoutQ{});
  typename Traits::KernelParams kp{
      params,
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.q, shape_q), layout_q, typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.dout, shape_q), layout_q, typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.k, shape_k), layout_k, typename Traits::TileK{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.v, shape_k), layout_k, typename Traits::TileK{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{}, gmem_tensor<Element>(p.dk, shape_dk), layout_k, typename Traits::TileK{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{}, gmem_tensor<Element>(p.dv, shape_dk), layout_k, typename Traits::TileK{}, _1{}),
  };
  dim3 const grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.batch, p.heads);
  return bool_switch(p.is_windowed, [&](auto windowed) {
    return launch_kernel(&bwd_dkdv_kernel<Traits, decltype(windowed)::value>, grid, Traits::kThreads,
                         Traits::kSmemSize, kp, stream);
  });
}

}  // namespace flash::sm90
