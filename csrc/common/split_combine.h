// Split-KV's combine (flash-decoding): merges the num_splits partial results of every query row, each
// normalised over its own split of the keys, by their LSEs:
//   lse = log(sum_s exp(lse_s)),   O = sum_s exp(lse_s - lse) * O_s.
// A split that saw no key has lse_s = -inf and weighs 0; a row that no split saw gets O = 0, LSE = +inf,
// as in the forward. Memory-bound and small next to the attention it follows: plain CUDA, no tensor cores.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include <cutlass/numeric_conversion.h>

#include "flash.h"

namespace flash {

// The combine of 4 columns (from vec * 4) of one (batch, head, query) row of the partials ((num_splits, rows,
// head_dim) fp32, rows = batch * heads * seqlen_q in that order) into o and lse. head_dim is a multiple of 8,
// so 4 columns are one 16-byte load from the partials and one 8-byte store into o. Its callers: the combine
// kernel below, and the split kernel's last block of a tile where the combine is folded in
// (combine_in_last_split).
template <typename Element>
__device__ __forceinline__ void combine_split_row(FwdParams const &p, index_t row, int vec) {
  index_t const rows = index_t(p.batch) * p.heads * p.seqlen_q;
  float max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) { max = fmaxf(max, p.lse_partial[s * rows + row]); }
  bool const empty = max == -INFINITY;
  float sum = 0.f;
  for (int s = 0; s < p.num_splits && !empty; ++s) { sum += expf(p.lse_partial[s * rows + row] - max); }
  float const lse = empty ? INFINITY : max + logf(sum);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < p.num_splits && !empty; ++s) {
    float const weight = expf(p.lse_partial[s * rows + row] - lse);
    if (weight == 0.f) { continue; }  // also keeps a split's unwritten rows out of the sum
    float4 const o = reinterpret_cast<float4 const *>(p.o_partial + (s * rows + row) * p.head_dim)[vec];
    acc.x += weight * o.x, acc.y += weight * o.y, acc.z += weight * o.z, acc.w += weight * o.w;
  }

  int const query = int(row % p.seqlen_q);
  index_t const batch_head = row / p.seqlen_q;
  int const head = int(batch_head % p.heads), batch = int(batch_head / p.heads);
  cutlass::NumericArrayConverter<Element, float, 4> convert;
  cutlass::Array<float, 4> const values{acc.x, acc.y, acc.z, acc.w};
  Element *out = static_cast<Element *>(p.o.ptr) + batch * p.o.batch_stride + query * p.o.row_stride +
                 head * p.o.head_stride + vec * 4;
  *reinterpret_cast<cutlass::Array<Element, 4> *>(out) = convert(values);
  if (vec == 0) { p.lse.ptr[batch * p.lse.batch_stride + head * p.lse.head_stride + query] = lse; }
}

// One thread per 4 columns of one row.
template <typename Element>
__global__ void split_combine_kernel(__grid_constant__ const FwdParams p) {
  int const vecs = p.head_dim / 4;
  index_t const rows = index_t(p.batch) * p.heads * p.seqlen_q;
  index_t const idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  index_t const row = idx / vecs;
  int const vec = int(idx % vecs);
  if (row >= rows) { return; }
  combine_split_row<Element>(p, row, vec);
}

// The combine folded into the split kernel (FLASH_ATTN2_DECODE_FUSED_COMBINE=1, flash_api.cpp): called by
// every block of a split tile after it stored its partial (all kThreads threads, no early exit before), it
// counts the tile's splits in p.split_counters; the block that counts last merges the tile's rows (query
// block m_block of (batch, head)) and sets the count back to 0, so the buffer is zero again for the next
// call or graph replay without a memset. Saves the combine's second launch, which under a CUDA graph waits
// for the split grid to drain (~2 us, benchmarks/NOTES.md). The fences: each thread's partial stores are
// made visible GPU-wide before the block's count (release); the last block fences again before it reads
// the other splits' partials (acquire), so that no load is served from a stale L1 line.
template <typename Element, int kBlockM, int kThreads>
__device__ __forceinline__ void combine_in_last_split(FwdParams const &p, int batch, int head, int m_block) {
  __shared__ bool last;
  int const m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  int *count = p.split_counters + (index_t(batch) * p.heads + head) * m_blocks + m_block;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(count, 1) == p.num_splits - 1;
    if (last) { *count = 0; }  // every split has counted: none of this launch touches it again
  }
  __syncthreads();
  if (!last) { return; }
  __threadfence();
  int const vecs = p.head_dim / 4;
  int const rows_here = min(kBlockM, p.seqlen_q - m_block * kBlockM);  // >= 1: the grid covers seqlen_q
  index_t const row0 = (index_t(batch) * p.heads + head) * p.seqlen_q + index_t(m_block) * kBlockM;
  for (int i = threadIdx.x; i < rows_here * vecs; i += kThreads) {
    combine_split_row<Element>(p, row0 + i / vecs, i % vecs);
  }
}

template <typename Element>
cudaError_t run_split_combine(FwdParams const &params, cudaStream_t stream) {
  constexpr int kThreads = 128;
  index_t const threads = index_t(params.batch) * params.heads * params.seqlen_q * (params.head_dim / 4);
  split_combine_kernel<Element><<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash
