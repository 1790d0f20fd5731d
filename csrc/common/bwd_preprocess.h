// Backward preprocess: D = rowsum(dO * O) per query row, in fp32. dS = P * (dP - D) needs it in both
// backward kernels. Memory-bound, so every lane should load: a row is shared by the fewest lanes (a power
// of two, for the shuffle reduction) whose 16-byte loads cover head_dim, and a warp takes 32 / kLanes rows.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "block_info.h"
#include "flash.h"
#include "launch_utils.h"
#include "utils.h"

namespace flash {

template <typename Element, int kLanes_>
struct PreprocessConfig {
  static constexpr int kLanes = kLanes_;                   // lanes per row
  static constexpr int kVec = 16 / sizeof(Element);        // elements per 16-byte load
  static constexpr int kCols = kLanes * kVec;              // head_dim <= kCols
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerPass = kThreads / kLanes;   // consecutive rows the block covers at once
  static constexpr int kRowsPerThread = 2;                 // both rows' loads in flight before any math
  static constexpr int kBlockRows = kRowsPerPass * kRowsPerThread;
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0);
};

// Grid (row blocks, batch, heads): batch and head come from the block index, no division.
template <typename Element, class Config>
__global__ void __launch_bounds__(Config::kThreads) bwd_preprocess_kernel(__grid_constant__ const BwdParams params) {
  constexpr int kLanes = Config::kLanes, kVec = Config::kVec, kRowsPerThread = Config::kRowsPerThread;
  using Vec = cutlass::AlignedArray<Element, kVec>;
  int const m_block = blockIdx.x, batch = blockIdx.y, head = blockIdx.z;

  BlockInfo const seq{params, batch};
  int const rows_left = seq.seqlen_q - m_block * Config::kBlockRows;
  if (rows_left <= 0) { return; }  // varlen: the grid is sized for the longest sequence; the whole block leaves

  Tensor mO = seq.q_rows<Config::kCols, Element const>(params.o, head);     // (seqlen_q, kCols)
  Tensor mdO = seq.q_rows<Config::kCols, Element const>(params.dout, head);  // (seqlen_q, kCols)
  Tensor mD = seq.q_values(params.dpsum, head);                               // (seqlen_q)
  auto const tile = Shape<Int<Config::kBlockRows>, Int<Config::kCols>>{};
  Tensor gO = local_tile(mO, tile, make_coord(m_block, 0));    // (kBlockRows, kCols)
  Tensor gdO = local_tile(mdO, tile, make_coord(m_block, 0));  // (kBlockRows, kCols)
  Tensor gD = local_tile(mD, Shape<Int<Config::kBlockRows>>{}, make_coord(m_block));  // (kBlockRows)

  int const lane = threadIdx.x % kLanes;
  int const col = lane * kVec;
  int const thread_row = threadIdx.x / kLanes;  // rows thread_row + i * kRowsPerPass, i < kRowsPerThread
  bool const col_ok = col < params.head_dim;  // lanes past head_dim (e.g. 3 of 8 at 40) load nothing

  Vec tOrO[kRowsPerThread], tOrdO[kRowsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    int const row = thread_row + i * Config::kRowsPerPass;
    if (col_ok && row < rows_left) {
      tOrO[i] = *reinterpret_cast<Vec const *>(&gO(row, col));
      tOrdO[i] = *reinterpret_cast<Vec const *>(&gdO(row, col));
    } else {
      tOrO[i].clear();
      tOrdO[i].clear();
    }
  }
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    float sum = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < kVec; ++j) { sum += float(tOrO[i][j]) * float(tOrdO[i][j]); }
    // Every lane reaches the shuffles (no early exit for rows past seqlen_q): the mask is the full warp.
    CUTE_UNROLL
    for (int offset = kLanes / 2; offset > 0; offset /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, offset); }
    int const row = thread_row + i * Config::kRowsPerPass;
    if (lane == 0 && row < rows_left) { gD(row) = sum; }
  }
}

// Launches with the fewest lanes per row whose loads cover head_dim (<= 256 = 32 lanes * 8, checked by the
// binding).
template <typename Element, int kLanes>
cudaError_t launch_bwd_preprocess(BwdParams const &params, cudaStream_t stream) {
  using Config = PreprocessConfig<Element, kLanes>;
  if constexpr (kLanes < 32) {
    if (params.head_dim > Config::kCols) { return launch_bwd_preprocess<Element, kLanes * 2>(params, stream); }
  }
  dim3 const grid(cute::ceil_div(params.seqlen_q, Config::kBlockRows), params.batch, params.heads);
  return launch_kernel(&bwd_preprocess_kernel<Element, Config>, grid, Config::kThreads, 0, params, stream);
}

template <typename Element>
cudaError_t run_bwd_preprocess(BwdParams const &params, cudaStream_t stream) {
  return launch_bwd_preprocess<Element, 1>(params, stream);
}

}  // namespace flash
