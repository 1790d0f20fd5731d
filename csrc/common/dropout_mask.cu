// The debug kernel of dropout.h: the keep mask of every (batch, head, query, key) for given (seed, offset),
// from the same unit and bit placement as the attention kernels, so that tests can apply the kernels' own
// mask in the reference. One thread per entry (8 times the calls the kernels make): small shapes only.
#include <cuda_runtime.h>

#include "dropout.h"
#include "dropout_mask.h"

namespace flash {

__global__ void dropout_mask_kernel(__grid_constant__ const DropoutMaskParams params) {
  int const key = blockIdx.x * blockDim.x + threadIdx.x;
  int const query = blockIdx.y;
  int const batch = blockIdx.z / params.heads, head = blockIdx.z % params.heads;
  if (key >= params.seqlen_k) { return; }
  uint64_t const seed = uint64_t(params.rng_state[0]), offset = uint64_t(params.rng_state[1]);
  uint64_t const stream = offset + uint64_t(batch) * uint64_t(params.heads) + uint64_t(head);
  Philox4x32 const rand = philox4x32_10(dropout_key_unit(key), dropout_query_unit(query), uint32_t(stream),
                                        uint32_t(stream >> 32), uint32_t(seed), uint32_t(seed >> 32));
  uint32_t const bits = (rand.word[dropout_word(query, key)] >> (16 * (key & 1))) & 0xffffu;
  int64_t const index = ((int64_t(batch) * params.heads + head) * params.seqlen_q + query) * params.seqlen_k + key;
  params.keep[index] = bits >= params.dropout_threshold;
}

cudaError_t run_dropout_mask(DropoutMaskParams const &params, cudaStream_t stream) {
  constexpr int kThreads = 128;
  dim3 const grid((params.seqlen_k + kThreads - 1) / kThreads, params.seqlen_q, params.batch * params.heads);
  dropout_mask_kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash
