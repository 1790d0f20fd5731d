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

// One head-major tensor as TMA sees it: (seqlen, head_dim, heads, batch).
template <typename Element>
auto gmem_tensor(HeadTensor const &t, int seqlen, int head_dim, int heads, int batch) {
  return make_tensor(make_gmem_ptr(static_cast<Element const *>(t.ptr)), GmemShape{seqlen, head_dim, heads, batch},
                     GmemStride{t.row_stride, _1{}, t.head_stride, t.batch_stride});
}

template <class Traits>
cudaError_t launch_fwd(FwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  typename Traits::KernelParams kp{
      params,
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.q, p.seqlen_q, p.head_dim, p.heads, p.batch),
                    typename Traits::SmemLayoutQ{}, typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.k, p.seqlen_k, p.head_dim, p.heads_kv, p.batch),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), typename Traits::TileKV{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.v, p.seqlen_k, p.head_dim, p.heads_kv, p.batch),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), typename Traits::TileKV{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{}, gmem_tensor<Element>(p.o, p.seqlen_q, p.head_dim, p.heads, p.batch),
                    typename Traits::SmemLayoutQ{}, typename Traits::TileQ{}, _1{}),
  };
  int device = 0, sm_count = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) { return err; }
  if (cudaError_t err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess) {
    return err;
  }
  return bool_switch(p.is_windowed, [&](auto windowed) {
    constexpr bool kWindowed = decltype(windowed)::value;
    dim3 const grid(TileScheduler<Traits::kBlockM, Traits::kPersistent && !kWindowed>::grid(p, sm_count));
    return launch_kernel(&fwd_kernel<Traits, kWindowed>, grid, Traits::kThreads, Traits::kSmemSize, kp, stream);
  });
}

template <int kHeadDim, typename Element>
cudaError_t run_fwd(FwdParams const &params, cudaStream_t stream) {
  return launch_fwd<FwdTraits<kHeadDim, Element>>(params, stream);
}

}  // namespace flash::sm90
