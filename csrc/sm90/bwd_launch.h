// Host-side launches of the Hopper backward kernels for one (head dim, dtype): TMA descriptors from the
// params, then one thread block per (key block, batch, query head) for dK/dV, per (query block, batch, head)
// for dQ (varlen: blocks of the longest sequence, those past a shorter one's end leaving at once). Built with
// sm_90a unless FLASH_ATTN2_BUILD_SM90_BWD=0.
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

// Whether a call may go to these kernels: varlen calls only where the launch was instantiated with MaybeVarlen.
template <bool MaybeVarlen>
bool bwd_launchable(BwdParams const &p) { return MaybeVarlen || p.cu_seqlens_q == nullptr; }

// Plain, causal, GQA, and with MaybeVarlen varlen too, its kernels chosen per call; with General the score
// mods too (mask.h; the binding checks needs_score_mod() against which one it calls). Traits: a BwdDkdvTraits,
// the tile_config.h one from run_bwd_dkdv, any from benchmarks/tile_sweep_sm90_bwd.cu (fixed-length:
// MaybeVarlen defaulted, so that it builds no varlen kernels). AtomicDq: Traits is a BwdDkdvAtomicDqTraits, and
// params.dq_accum is zeroed fp32 (common variant only).
template <class Traits, bool MaybeVarlen = false, bool AtomicDq = false, bool General = false>
cudaError_t launch_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  if (!bwd_launchable<MaybeVarlen>(p)) { return cudaErrorNotSupported; }
  // Varlen: the one-batch views (kernel_traits.h); else the fixed-length ones, as tma_shape_*<false>.
  GmemShape const shape_q = tma_shape_q<MaybeVarlen>(p), shape_k = tma_shape_k<MaybeVarlen>(p),
                  shape_dk = tma_shape_dk<MaybeVarlen>(p);
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
  dim3 const grid(ceil_div(p.seqlen_k, Traits::kBlockN), p.batch, p.heads);  // varlen: the longest sequence's
  return bool_switch(p.is_windowed, [&](auto windowed) {
    constexpr bool kWindowed = decltype(windowed)::value;
    auto launch = [&](auto kernel) { return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSmemSize, kp, stream); };
    if constexpr (MaybeVarlen) {
      if (p.cu_seqlens_q != nullptr) { return launch(&bwd_dkdv_kernel<Traits, kWindowed, true, AtomicDq, General>); }
    }
    return launch(&bwd_dkdv_kernel<Traits, kWindowed, false, AtomicDq, General>);
  });
}

// As launch_bwd_dkdv (one predicate in the binding for both, General included); dQ, then D rewritten, before
// the dK/dV kernel runs. Traits: a BwdDqTraits.
template <class Traits, bool MaybeVarlen = false, bool General = false>
cudaError_t launch_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  using Element = typename Traits::Element;
  auto const &p = params;
  if (!bwd_launchable<MaybeVarlen>(p)) { return cudaErrorNotSupported; }
  GmemShape const shape_q = tma_shape_q<MaybeVarlen>(p), shape_k = tma_shape_k<MaybeVarlen>(p);
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
  dim3 const grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.batch, p.heads);  // varlen: the longest sequence's
  return bool_switch(p.is_windowed, [&](auto windowed) {
    constexpr bool kWindowed = decltype(windowed)::value;
    auto launch = [&](auto kernel) { return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSmemSize, kp, stream); };
    if constexpr (MaybeVarlen) {
      if (p.cu_seqlens_q != nullptr) { return launch(&bwd_dq_kernel<Traits, kWindowed, true, General>); }
    }
    return launch(&bwd_dq_kernel<Traits, kWindowed, false, General>);
  });
}

// The instantiation units' entry points: the tiles of tile_config.h, fixed-length and varlen kernels each.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<BwdDkdvTraits<kHeadDim, Element>, true>(params, stream);
}
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dq(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dq<BwdDqTraits<kHeadDim, Element>, true>(params, stream);
}
// The general variant's (softcap, ALiBi, a window's left edge, dropout; mask.h) on the same tiles: in
// translation units of their own (built by default; FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0 leaves them out), so
// that the common kernels and their build do not change.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv_general(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<BwdDkdvTraits<kHeadDim, Element>, true, false, true>(params, stream);
}
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dq_general(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dq<BwdDqTraits<kHeadDim, Element>, true, true>(params, stream);
}
// dK, dV and (atomically, into params.dq_accum) dQ, on run_bwd_dkdv's tiles: in translation units of their own
// (FLASH_ATTN2_BUILD_ATOMIC_BWD=1), so that the split backward's kernels and their build do not change.
template <int kHeadDim, typename Element>
cudaError_t run_bwd_dkdv_atomic_dq(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_dkdv<BwdDkdvAtomicDqTraits<BwdDkdvTraits<kHeadDim, Element>>, true, true>(params, stream);
}

}  // namespace flash::sm90
