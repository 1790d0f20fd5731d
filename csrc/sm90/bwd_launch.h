// Host-side launches of the Hopper backward kernels for one (head dim, dtype): TMA descriptors from the
// params, then one thread block per (key block, batch, query head) for dK/dV, per (query block, batch, head)
// for dQ. Built only with FLASH_ATTN2_BUILD_SM90_BWD=1.
#pragma once

#include <cuda_runtime.h>

#include "common/flash.h"
#include "common/launch_utils.h"

#include "bwd_dkdv_kernel.h"
#include "bwd_dq_kernel.h"
#include "bwd_kernel_traits.h"
#include "fwd_launch.h"  // gmem_tensor(): a head-major tensor as TMA sees it

namespace flash::sm90 {

// A TMA copy (load or store) of one head-major tensor in tiles of Tile, into or out of smem_layout.
template <typename Element, class TmaOp, class SmemLayout, class Tile>
auto bwd_tma(TmaOp op, HeadTensor const &t, GmemShape const &shape, SmemLayout const &smem_layout, Tile tile) {
  return make_tma_copy(op, gmem_tensor<Element>(t, shape), smem_layout, tile, _1{});
}

// The common variant only (the binding checks !needs_general()): plain, causal, GQA. Traits: a
// BwdDkdvTraits, the tile_config.h one from run_bwd_dkdv, any from benchmarks/tile_sweep_sm90_bwd.cu.
template <class Traits>
cudaError_t launch_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  GmemShape const shape_q = tma_shape_q<false>(p), shape_k = tma_shape_k<false>(p), shape_dk = tma_shape_dk(p);
  typename Traits::SmemLayoutK const layout_k{};
  auto const layout_q = take<0, 2>(typename Traits::SmemLayoutQ{});
  typename Traits::TileQ const tile_q{};
  typename Traits::TileK const tile_k{};
  typename Traits::KernelParams kp{
      params,
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.q, shape_q, layout_q, tile_q),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.dout, shape_q, layout_q, tile_q),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.k, shape_k, layout_k, tile_k),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.v, shape_k, layout_k, tile_k),
      bwd_tma<Element>(SM90_TMA_STORE{}, p.dk, shape_dk, layout_k, tile_k),
      bwd_tma<Element>(SM90_TMA_STORE{}, p.dv, shape_dk, layout_k, tile_k),
  };
  dim3 const grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.batch, p.heads);
  return bool_switch(p.is_windowed, [&](auto windowed) {
    return launch_kernel(&bwd_dkdv_kernel<Traits, decltype(windowed)::value>, grid, Traits::kThreads,
                         Traits::kSmemSize, kp, stream);
  });
}

// The common variant only, as launch_bwd_dkdv (one predicate in the binding for both); dQ, then D
// rewritten, before the dK/dV kernel runs. Traits: a BwdDqTraits.
template <class Traits>
cudaError_t launch_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  GmemShape const shape_q = tma_shape_q<false>(p), shape_k = tma_shape_k<false>(p);
  typename Traits::SmemLayoutQ const layout_q{};
  auto const layout_k = take<0, 2>(typename Traits::SmemLayoutK{});
  typename Traits::TileQ const tile_q{};
  typename Traits::TileK const tile_k{};
  typename Traits::KernelParams kp{
      params,
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.q, shape_q, layout_q, tile_q),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.dout, shape_q, layout_q, tile_q),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.k, shape_k, layout_k, tile_k),
      bwd_tma<Element>(SM90_TMA_LOAD{}, p.v, shape_k, layout_k, tile_k),
      bwd_tma<Element>(SM90_TMA_STORE{}, p.dq, shape_q, layout_q, tile_q),
  };
  dim3 const grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.batch, p.heads);
  return bool_switch(p.is_windowed, [&](auto windowed) {
    return launch_kernel(&bwd_dq_kernel<Traits, decltype(windowed)::value>, grid, Traits::kThreads,
                         Traits::kSmemSize, kp, stream);
  });
}

// The instantiation units' entry points: the tiles of tile_config.h.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<BwdDkdvTraits<kHeadDim, Element>>(params, stream);
}
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dq<BwdDqTraits<kHeadDim, Element>>(params, stream);
}

}  // namespace flash::sm90
