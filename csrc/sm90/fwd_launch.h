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

// One kernel of the forward: Windowed (causal or a window), Varlen and ScoreMod fixed by the caller. Varlen:
// the kernels that may be given cu_seqlens (the general unit's), whose TMA views are then the one-batch ones.
template <class Traits, bool kWindowed, bool Varlen, bool ScoreMod = Varlen>
cudaError_t launch_fwd_kernel(FwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  GmemShape const shape_q = tma_shape_q<Varlen>(p), shape_k = tma_shape_k<Varlen>(p);
  typename Traits::KernelParams kp{
      params,
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.q, shape_q), typename Traits::SmemLayoutQ{},
                    typename Traits::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.k, shape_k), take<0, 2>(typename Traits::SmemLayoutKV{}),
                    typename Traits::TileKV{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_tensor<Element>(p.v, shape_k), take<0, 2>(typename Traits::SmemLayoutKV{}),
                    typename Traits::TileKV{}, _1{}),
      // Varlen: used for the tiles that lie wholly inside their sequence (fwd_epilogue.h).
      make_tma_copy(SM90_TMA_STORE{}, gmem_tensor<Element>(p.o, shape_q), typename Traits::SmemLayoutQ{},
                    typename Traits::TileQ{}, _1{}),
  };
  int sm_count = 0;
  if (cudaError_t err = current_sm_count(sm_count); err != cudaSuccess) { return err; }
  dim3 const grid(TileScheduler<Traits::kBlockM, Traits::kPersistent && !kWindowed>::grid(p, sm_count));
  return launch_kernel(&fwd_kernel<Traits, kWindowed, Varlen, ScoreMod>, grid, Traits::kThreads, Traits::kSmemSize,
                       kp, stream);
}

// Both Windowed kernels of one tile. benchmarks/tile_sweep_sm90.cu launches the common ones (Varlen defaulted).
template <class Traits, bool Varlen = false>
cudaError_t launch_fwd(FwdParams const &params, cudaStream_t stream) {
  return bool_switch(params.is_windowed, [&](auto windowed) {
    return launch_fwd_kernel<Traits, decltype(windowed)::value, Varlen>(params, stream);
  });
}

// The common key loop's two kernels (no score mod): windowed calls on the tile that skips key blocks, the rest
// (every row sees every key) on the full-rows tile (tile_config.h; the same traits where it does not differ).
template <int kHeadDim, typename Element, bool Varlen>
cudaError_t launch_fwd_common(FwdParams const &params, cudaStream_t stream) {
  return params.is_windowed
             ? launch_fwd_kernel<FwdTraitsOf<kHeadDim, Element, false>, true, Varlen, false>(params, stream)
             : launch_fwd_kernel<FwdTraitsOf<kHeadDim, Element, true>, false, Varlen, false>(params, stream);
}

// The common variant (plain, causal, right window edges, GQA, sinks) and the general one (AttnParams::
// needs_general: varlen, softcap, ALiBi, left window edges, dropout), in translation units of their own; the
// general one's unit holds both its kernels, plain-or-causal varlen (Varlen) and the rest (Varlen, ScoreMod).
template <int kHeadDim, typename Element>
cudaError_t run_fwd(FwdParams const &params, cudaStream_t stream) {
  return launch_fwd_common<kHeadDim, Element, false>(params, stream);
}
// The general unit: of its calls, the varlen ones that need no score mod run the common key loop
// (FwdTile::varlen_common_loop) as run_fwd's do; the rest run the general kernel (ScoreMod).
template <int kHeadDim, typename Element>
cudaError_t run_fwd_general(FwdParams const &params, cudaStream_t stream) {
  using Traits = FwdTraitsOf<kHeadDim, Element, false>;
  if constexpr (Traits::kVarlenCommonLoop) {
    if (!params.needs_score_mod()) { return launch_fwd_common<kHeadDim, Element, true>(params, stream); }
  }
  return launch_fwd<Traits, true>(params, stream);
}

}  // namespace flash::sm90
