// Host-side launch of the Hopper forward for one (head dim, dtype): TMA descriptors from the params, then
// the kernel, a persistent grid of at most one thread block per SM.
#pragma once

#include <cuda_runtime.h>

#include "common/flash.h"
#include "common/launch_utils.h"

#include "fwd_kernel.h"
#include "kernel_traits.h"
#include "tile_scheduler.h"

namespace flash::sm90 {

// One head-major tensor as TMA sees it: shape (seqlen, head_dim, heads, batch), kernel_traits.h's
// tma_shape_*. A varlen tensor (batch_stride 0) is one batch: its batch stride, never stepped over, is given
// as the head stride, which TMA's alignment rule holds for already.
template <typename Element>
auto gmem_tensor(HeadTensor const &t, GmemShape const &shape) {
  index_t const batch_stride = t.batch_stride != 0 ? t.batch_stride : t.head_stride;
  return make_tensor(make_gmem_ptr(static_cast<Element const *>(t.ptr)), shape,
                     GmemStride{t.row_stride, _1{}, t.head_stride, batch_stride});
}

template <class Traits, bool General>
cudaError_t launch_fwd(FwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  GmemShape const shape_q = tma_shape_q<General>(p), shape_k = tma_shape_k<General>(p);
  typename Traits::KernelParams kp{
      params,
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.q, shape_q), typename Traits::SmemLayoutQ{},
                    typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.k, shape_k), take<0, 2>(typename Traits::SmemLayoutKV{}),
                    typename Traits::TileKV{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.v, shape_k), take<0, 2>(typename Traits::SmemLayoutKV{}),
                    typename Traits::TileKV{}, _1{}),
      // Unused for varlen, whose O the consumers store (fwd_epilogue.h).
      make_tma_copy(SM90_TMA_STORE{}, gmem_tensor<Element>(p.o, shape_q), typename Traits::SmemLayoutQ{},
                    typename Traits::TileQ{}, _1{}),
  };
  int sm_count = 0;
  if (cudaError_t err = current_sm_count(sm_count); err != cudaSuccess) { return err; }
  return bool_switch(p.is_windowed, [&](auto windowed) {
    constexpr bool kWindowed = decltype(windowed)::value;
    dim3 const grid(TileScheduler<Traits::kBlockM, Traits::kPersistent && !kWindowed>::grid(p, sm_count));
    return launch_kernel(&fwd_kernel<Traits, kWindowed, General>, grid, Traits::kThreads, Traits::kSmemSize, kp,
                         stream);
  });
}

// The common variant (plain, causal, right window edges, GQA, sinks) and the general one (AttnParams::
// needs_general: varlen, softcap, ALiBi, left window edges, dropout), in translation units of their own.
template <int kHeadDim, typename Element>
cudaError_t run_fwd(FwdParams const &params, cudaStream_t stream) {
  return launch_fwd<FwdTraits<kHeadDim, Element>, false>(params, stream);
}
template <int kHeadDim, typename Element>
cudaError_t run_fwd_general(FwdParams const &params, cudaStream_t stream) {
  return launch_fwd<FwdTraits<kHeadDim, Element>, true>(params, stream);
}

}  // namespace flash::sm90
