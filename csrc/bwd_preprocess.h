// Backward preprocess: D = rowsum(dO * O) per query row, in fp32. dS = P * (dP - D) needs it in both
// backward kernels. Memory-bound: one warp per row, 16-byte loads.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "flash.h"
#include "launch_utils.h"

namespace flash {

template <typename Element, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) bwd_preprocess_kernel(__grid_constant__ const BwdParams params) {
  constexpr int kVec = 16 / sizeof(Element);
  int64_t const row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // over (batch, seqlen_q, heads)
  int const lane = threadIdx.x % 32;
  if (row >= int64_t(params.batch) * params.seqlen_q * params.heads) { return; }
  int const head = row % params.heads;
  int const i = (row / params.heads) % params.seqlen_q;
  int const batch = row / (int64_t(params.heads) * params.seqlen_q);
  auto const *o = static_cast<Element const *>(params.o_ptr) + batch * params.o_batch_stride +
                  i * params.o_row_stride + head * params.o_head_stride;
  auto const *dout = static_cast<Element const *>(params.do_ptr) + batch * params.do_batch_stride +
                     i * params.do_row_stride + head * params.do_head_stride;
  float sum = 0.f;
  for (int col = lane * kVec; col < params.head_dim; col += 32 * kVec) {
    cutlass::Array<Element, kVec> o_vec = *reinterpret_cast<cutlass::Array<Element, kVec> const *>(o + col);
    cutlass::Array<Element, kVec> do_vec = *reinterpret_cast<cutlass::Array<Element, kVec> const *>(dout + col);
    CUTE_UNROLL
    for (int j = 0; j < kVec; ++j) { sum += float(o_vec[j]) * float(do_vec[j]); }
  }
  CUTE_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, offset); }
  if (lane == 0) { params.dpsum_ptr[(int64_t(batch) * params.heads + head) * params.seqlen_q + i] = sum; }
}

template <typename Element>
cudaError_t run_bwd_preprocess(BwdParams const &params, cudaStream_t stream) {
  constexpr int kWarps = 8;
  int64_t const rows = int64_t(params.batch) * params.seqlen_q * params.heads;
  return launch_kernel(&bwd_preprocess_kernel<Element, kWarps>, dim3(cute::ceil_div(rows, int64_t(kWarps))), kWarps * 32, 0,
                       params, stream);
}

}  // namespace flash
